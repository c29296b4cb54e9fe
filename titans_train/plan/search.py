"""Which layouts fit, ranked by throughput; and, for one that does not, what to change."""

from __future__ import annotations

from dataclasses import replace

from titans_train.parallel.layout import ParallelConfigError
from titans_train.parallel.validation import validate_parallel_layout

from .planner import GIB, Hardware, Layout, Plan, PlanError, RunShape, evaluate


def valid(run: RunShape, hardware: Hardware, layout: Layout) -> bool:
    try:
        validate_parallel_layout(run.model, tp=layout.tp, sp=layout.sp, world_size=hardware.world_size,
                                 seq_len=run.seq_len, tp_sequence_sharding=layout.tp_sequence_sharding,
                                 activation_checkpointing=layout.activation_checkpointing,
                                 zero_stage=layout.zero_stage)
    except ParallelConfigError:
        return False
    samples = run.global_batch_tokens // run.seq_len
    dp = hardware.world_size // (layout.tp * layout.sp)
    return samples % (layout.micro_batch * dp) == 0


def candidates(run: RunShape, hardware: Hardware) -> list[Layout]:
    """tp within a node, sp up to 8, powers of two; every ZeRO stage; micro batches up to 16,
    with and without checkpointing; tp sequence sharding whenever tp > 1 (it only saves memory)."""
    layouts = []
    powers = [1, 2, 4, 8]
    for tp in [t for t in powers if t <= hardware.gpus_per_node]:
        for sp in powers:
            for zero in (0, 1, 2, 3):
                for micro in (1, 2, 4, 8, 16):
                    for checkpointing in (False, True):
                        layout = Layout(tp, sp, zero, micro, checkpointing, tp_sequence_sharding=tp > 1)
                        if valid(run, hardware, layout):
                            layouts.append(layout)
    return layouts


def search(run: RunShape, hardware: Hardware, mfu: float) -> list[Plan]:
    """Every fitting layout, fastest first (ties: less memory first)."""
    plans = [evaluate(run, hardware, layout, mfu) for layout in candidates(run, hardware)]
    fitting = [plan for plan in plans if plan.fits]
    return sorted(fitting, key=lambda plan: (-plan.term("tokens per s"), plan.peak_bytes))


def _one_change(layout: Layout) -> list[tuple[str, Layout]]:
    changes = []
    if not layout.activation_checkpointing:
        changes.append(("--activation-checkpointing", replace(layout, activation_checkpointing=True)))
    micro = layout.micro_batch // 2
    while micro >= 1:  # the largest smaller micro batch comes first; `advise` keeps the first fit
        changes.append((f"--micro-batch {micro}", replace(layout, micro_batch=micro)))
        micro //= 2
    if layout.zero_stage < 3:
        changes.append((f"--zero {layout.zero_stage + 1}", replace(layout, zero_stage=layout.zero_stage + 1)))
    if layout.tp > 1 and not layout.tp_sequence_sharding:
        changes.append(("--tp-sequence-sharding", replace(layout, tp_sequence_sharding=True)))
    changes.append((f"--tp {layout.tp * 2}", replace(layout, tp=layout.tp * 2)))
    changes.append((f"--sp {layout.sp * 2}", replace(layout, sp=layout.sp * 2)))
    return changes


def advise(run: RunShape, hardware: Hardware, plan: Plan, mfu: float) -> list[str]:
    """For a plan that does not fit: by how much, and the single changes that make it fit."""
    over = plan.peak_bytes - plan.usable_bytes
    largest = max(plan.memory, key=lambda term: term.value)
    advice = [f"does not fit: {plan.peak_bytes / GIB:.1f} GiB per GPU needed, {plan.usable_bytes / GIB:.1f} GiB "
              f"usable on {hardware.device.name}: {over / GIB:.1f} GiB over (largest term: {largest.name}, "
              f"{largest.value / GIB:.1f} GiB)"]
    fixes = []
    for flag, layout in _one_change(plan.layout):
        if not valid(run, hardware, layout) or (flag.startswith("--micro-batch") and
                                                any(fix.startswith("--micro-batch") for fix in fixes)):
            continue
        try:
            changed = evaluate(run, hardware, layout, mfu)
        except PlanError:
            continue
        if changed.fits:
            fixes.append(f"{flag}: {changed.peak_bytes / GIB:.1f} GiB, {changed.term('tokens per s'):,.0f} tokens/s")
    if fixes:
        advice += ["each of these alone fits:"] + [f"  {fix}" for fix in fixes]
    else:
        advice.append("no single change fits: `--search` ranks the layouts that do, if any; otherwise more "
                      "GPUs (--nodes) or a GPU with more memory (--gpu)")
    return advice
