"""Checks of `parallel.tp` / `parallel.sp` against the model and the world, before any group work.

Each failure is a `ParallelConfigError` naming the config key, the numbers that clash and the fix.
"""

from __future__ import annotations

from titans_train.parallel.layout import ParallelConfigError, ParallelLayout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_tensor_parallel(model_config, tp: int) -> None:
    """Heads are the tensor-parallel unit: every head count (and the MLP width) must divide by tp."""
    checks = [("model.n_heads", model_config.n_heads)]
    if model_config.has_memory:
        checks.append(("model.n_memory_heads", model_config.memory_heads))
    checks.append(("model.mlp_hidden_dim", model_config.mlp_hidden))
    for key, value in checks:
        if value % tp:
            usable = [d for d in _divisors(value) if d > 1]
            raise ParallelConfigError(
                "parallel.tp",
                f"{key} = {value} is not divisible by parallel.tp = {tp}: tensor parallelism splits "
                f"whole heads (and MLP channels) over the tp ranks. Use a parallel.tp in {usable or [1]} "
                f"(dividing every head count), or change {key}.",
            )


def validate_sequence_parallel(model_config, sp: int, seq_len: int) -> None:
    """Span length T/sp must be whole and a multiple of the chunk size (and MAC segment length),
    so chunk and segment boundaries, and so the result, do not move with sp."""
    if seq_len % sp:
        raise ParallelConfigError(
            "parallel.sp",
            f"sequence length {seq_len} does not split into parallel.sp = {sp} equal spans; "
            f"use a parallel.sp in {_divisors(seq_len)} or a seq_len divisible by {sp}.",
        )
    span = seq_len // sp
    units = []
    if model_config.has_memory:
        units.append(("model.chunk_size", model_config.chunk_size))
    if model_config.variant == "mac":
        units.append(("model.segment_len", model_config.segment_len))
    for key, unit in units:
        if span % unit:
            good = [p for p in _divisors(seq_len) if (seq_len // p) % unit == 0]
            raise ParallelConfigError(
                "parallel.sp",
                f"span length seq_len / parallel.sp = {seq_len} / {sp} = {span} is not a multiple "
                f"of {key} = {unit}, so a span boundary would cut a {key.split('.')[1]} in two. "
                f"Use a parallel.sp in {good} or a seq_len that is a multiple of {sp} x {unit}.",
            )


def validate_tp_sequence_sharding(*, tp: int, sp: int, seq_len: int, enabled: bool) -> None:
    """With `parallel.tp_sequence_sharding` each span of seq_len / sp tokens is split over the tp
    ranks in the norm regions, so it must divide by tp. At tp = 1 the option changes nothing and
    is accepted (as megatron-core does), so one recipe serves every tp. Call after the sp checks
    (the span must be whole)."""
    if not enabled or tp == 1:
        return
    span = seq_len // sp
    if span % tp:
        good = [t for t in _divisors(span) if t > 1]
        raise ParallelConfigError(
            "parallel.tp_sequence_sharding",
            f"the span length seq_len / parallel.sp = {seq_len} / {sp} = {span} does not split "
            f"over parallel.tp = {tp} ranks in the sequence-sharded norm regions. Use a seq_len "
            f"that is a multiple of parallel.sp x parallel.tp = {sp * tp}, a parallel.tp dividing "
            f"{span} ({good or 'none > 1'}), or parallel.tp_sequence_sharding=false.",
        )


SP_SCHEDULES = ("relay", "scan")


def validate_sp_schedule(model_config, sp_schedule: str, *, sp: int = 1, seq_len: int | None = None,
                         activation_checkpointing: bool = False, zero_stage: int = 0) -> None:
    """`parallel.sp_schedule = "scan"` (lockstep span owners, `scan_schedule.py`) needs a memory
    whose span effect is affine (memory_depth 1, surprise_bound 0) and whose keys, values and gates
    depend only on the layer input (lmm, mag, mal), and spans at least as long as every exchanged tail."""
    if sp_schedule not in SP_SCHEDULES:
        raise ParallelConfigError("parallel.sp_schedule",
                                  f"must be one of {list(SP_SCHEDULES)}, got {sp_schedule!r}")
    if sp_schedule == "relay":
        return
    variant = model_config.variant
    if variant == "mac":
        reason = ("mac's memory stores the attention output, which depends on the retrieval from "
                  "the incoming memory state, so the state cannot be found before the span runs")
    elif not model_config.has_memory:
        reason = f"{variant} has no memory to scan"
    elif model_config.memory_depth != 1:
        reason = (f"model.memory_depth = {model_config.memory_depth}: only a linear memory "
                  "(memory_depth 1) changes its state affinely over a span")
    elif model_config.surprise_bound > 0:
        reason = (f"model.surprise_bound = {model_config.surprise_bound} scales each token's update by a "
                  "factor that depends on the memory state, so the span's effect is not affine")
    elif activation_checkpointing and sp > 1:
        reason = ("parallel.activation_checkpointing would repeat the neighbour exchanges during "
                  "recomputation (use the relay, or turn activation checkpointing off)")
    elif zero_stage == 3 and sp > 1:
        reason = "ZeRO-3 with the scan schedule is not supported (use zero_stage 1 or 2, or the relay)"
    else:
        reason = None
    if reason is not None:
        raise ParallelConfigError(
            "parallel.sp_schedule",
            f"'scan' cannot run variant {variant} with memory_depth {model_config.memory_depth}: "
            f"{reason}. Use parallel.sp_schedule=relay (exact for every variant and depth).",
        )
    if seq_len is None or sp == 1:
        return
    span = seq_len // sp
    tails = [("model.conv_kernel - 1", model_config.conv_kernel - 1)]
    if model_config.attention_window is not None:
        tails.append(("model.window - 1", model_config.attention_window - 1))
    for name, length in tails:
        if span < length:
            raise ParallelConfigError(
                "parallel.sp_schedule",
                f"'scan' exchanges tails of {name} = {length} tokens computed from one span alone, "
                f"but the span seq_len / parallel.sp = {seq_len} / {sp} = {span} is shorter. Use a "
                "smaller parallel.sp, a longer seq_len, or parallel.sp_schedule=relay.",
            )


def validate_parallel_layout(model_config, *, tp: int, sp: int, world_size: int | None, seq_len: int,
                             tp_sequence_sharding: bool = False, sp_schedule: str = "relay",
                             activation_checkpointing: bool = False,
                             zero_stage: int = 0) -> ParallelLayout | None:
    """Every layout check, before any process group exists: the one entry point (config
    validation calls it). Returns the (tp, sp, dp) layout, None when `world_size` is unknown."""
    layout = None if world_size is None else ParallelLayout.from_world(world_size, tp=tp, sp=sp)
    validate_tensor_parallel(model_config, tp)
    if sp > 1:
        validate_sequence_parallel(model_config, sp, seq_len)
    validate_tp_sequence_sharding(tp=tp, sp=sp, seq_len=seq_len, enabled=tp_sequence_sharding)
    validate_sp_schedule(model_config, sp_schedule, sp=sp, seq_len=seq_len,
                         activation_checkpointing=activation_checkpointing, zero_stage=zero_stage)
    return layout
