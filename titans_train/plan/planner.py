"""The cluster planner: per-GPU memory, communication and time of one run on one layout.

Every number is a named term with the formula it comes from (`Term.formula`), in the habit of
Megatron-LM's `theoretical_memory_usage.py` and DeepSpeed's `estimate_zero3_model_states_mem_needs`.
Symbols: P = parameters one tp rank holds (shards + replicated, `model_facts`), N = the ZeRO
group (dp x sp, or dp for ZeRO-3 under sp: `parallel.zero.zero_partitions_over_sp`), L layers,
B micro batch, S span = seq_len / sp, D width, V vocabulary, a = accumulation steps.
Byte widths: bf16 runs hold bf16 parameters and gradients with fp32 master weights and Adam
moments (DeepSpeed's bf16 wrappers and ZeRO optimizers: 2 + 2 + 12 bytes per parameter), or
with `train.optimizer_precision=bf16` bf16 ones (2 + 2 + 6); fp32 runs hold 4 + 4 + 8, plus a
4-byte fp32 partition copy once ZeRO (stage >= 1) manages them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import torch

from titans_train.model import TitansConfig, TitansLM
from titans_train.model.flops import flops_per_token
from titans_train.parallel.zero import zero_partitions_over_sp
from titans_train.parallel.zero_buckets import zero_buckets

from .activations import TracedActivations, trace_activations
from .devices import GIB, RESERVE_FIXED_BYTES, Device, usable_bytes
from .model_facts import ModelFacts, model_facts

DEFAULT_MFU = 0.4
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Hardware:
    device: Device
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: int = 1
    zero_stage: int = 1
    micro_batch: int = 1
    activation_checkpointing: bool = False
    tp_sequence_sharding: bool = False


@dataclass(frozen=True)
class RunShape:
    """The parts of a run config the planner reads."""

    model: TitansConfig
    seq_len: int
    global_batch_tokens: int
    tokens: int  # the run's token budget
    precision: str  # fp32 | bf16
    optimizer_precision: str = "fp32"  # of master weights and Adam moments: fp32 | bf16
    zero_bucket_elements: int = 0  # parallel.zero_bucket_elements (0: the rule of parallel/zero_buckets.py)


@dataclass
class Term:
    name: str
    value: float
    formula: str


@dataclass
class Plan:
    layout: Layout
    hardware: Hardware
    dp: int
    accumulation: int
    memory: list[Term]
    communication: list[Term]  # bytes one GPU sends per optimizer step, by kind
    time: list[Term]
    fits: bool
    usable_bytes: float
    facts: ModelFacts
    advice: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(t.value for t in self.memory)

    def term(self, name: str) -> float:
        for term in self.memory + self.communication + self.time:
            if term.name == name:
                return term.value
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "fits": self.fits,
            "peak_bytes_per_gpu": self.peak_bytes,
            "usable_bytes_per_gpu": self.usable_bytes,
            "headroom_bytes": self.usable_bytes - self.peak_bytes,
            "layout": {**asdict(self.layout), "dp": self.dp, "gradient_accumulation_steps": self.accumulation},
            "hardware": {"gpu": self.hardware.device.name, "nodes": self.hardware.nodes,
                         "gpus_per_node": self.hardware.gpus_per_node},
            "parameters": self.facts.parameters,
            "memory": [asdict(t) for t in self.memory],
            "communication": [asdict(t) for t in self.communication],
            "time": [asdict(t) for t in self.time],
            "advice": self.advice,
        }


class PlanError(ValueError):
    """A layout the planner cannot evaluate (not a matter of memory). `key` names the option."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _key(model: TitansConfig) -> tuple:
    """A hashable stand-in for a (mutable, unhashable) TitansConfig, for the caches below."""
    return tuple(sorted(model.to_dict().items()))


def _traced(key: tuple, micro_batch: int, span: int, sp: int, precision: str) -> TracedActivations:
    """Saved bytes are affine in the micro batch (a tensor either has the batch dimension or,
    like an attention mask, none), so two traces give every micro batch exactly."""
    if micro_batch <= 2:
        return _trace(key, micro_batch, span, sp, precision)
    one, two = _trace(key, 1, span, sp, precision), _trace(key, 2, span, sp, precision)
    return TracedActivations(*(_extrapolate(a, b, micro_batch) for a, b in zip(
        (one.layer, one.head, one.layer_input_bytes, one.logits_bytes),
        (two.layer, two.head, two.layer_input_bytes, two.logits_bytes))))


def _extrapolate(one, two, micro_batch: int):
    if isinstance(one, int):
        return one + (two - one) * (micro_batch - 1)
    return type(one)(*(_extrapolate(a, b, micro_batch) for a, b in zip(
        (one.full_width, one.sharded), (two.full_width, two.sharded))))


@lru_cache(maxsize=256)
def _trace(key: tuple, micro_batch: int, span: int, sp: int, precision: str) -> TracedActivations:
    return trace_activations(TitansConfig(**dict(key)), micro_batch, span, sp, _dtype(precision))


@lru_cache(maxsize=64)
def _facts(key: tuple, tp: int) -> ModelFacts:
    return model_facts(TitansConfig(**dict(key)), tp)


def relay_state_bytes(model: TitansConfig, micro_batch: int, position: int, tp: int, precision: str) -> int:
    """Bytes of one layer's state after `position` tokens on one tp rank: what the relay hands
    from a span owner to the next (every state tensor is per head, so it splits by tp)."""
    return _relay_state_bytes(_key(model), micro_batch, position, tp, precision)


@lru_cache(maxsize=256)
def _relay_state_bytes(key: tuple, micro_batch: int, position: int, tp: int, precision: str) -> int:
    with torch.device("meta"):
        block = TitansLM(replace(TitansConfig(**dict(key)), n_layers=1)).layers[0]
    elements = sum(int(torch.Size(shape).numel()) for shape in block.state_shapes(micro_batch, position).values())
    return elements // tp * torch.empty((), dtype=_dtype(precision)).element_size()


def relay_bytes_per_micro_step(model: TitansConfig, micro_batch: int, seq_len: int, tp: int, sp: int,
                               sp_rank: int, precision: str) -> int:
    """Bytes rank `sp_rank` sends through the relay for one micro-batch: forward, each layer's
    state at its span end (all but the last owner); backward, the gradient of the state it
    received, of the same size (all but the first)."""
    span = seq_len // sp
    sent = 0
    if sp_rank < sp - 1:
        sent += model.n_layers * relay_state_bytes(model, micro_batch, (sp_rank + 1) * span, tp, precision)
    if sp_rank > 0:
        sent += model.n_layers * relay_state_bytes(model, micro_batch, sp_rank * span, tp, precision)
    return sent


def tp_all_reduce_elements(model: TitansConfig, facts: ModelFacts, micro_batch: int, span: int,
                           activation_checkpointing: bool = False) -> int:
    """Elements tp all-reduces for one micro-batch (no tp sequence sharding).

    Forward: the vocab-parallel embedding (B, S, D), every row-parallel output (B, S, D) and the
    cross-entropy's 3 (B, S) reductions; backward: every column-parallel projection's input
    gradient (B, S, D), the LM head's included. Checkpointing recomputes the layers' forward.
    """
    activation = micro_batch * span * model.dim
    layers_forward = model.n_layers * facts.row_projections * activation
    forward = activation + layers_forward + 3 * micro_batch * span
    backward = (model.n_layers * facts.column_projections + 1) * activation
    recompute = layers_forward if activation_checkpointing else 0
    return forward + backward + recompute


def _ring(size: int) -> float:
    """Fraction of a buffer each rank sends in a ring reduce-scatter or all-gather."""
    return (size - 1) / size


def evaluate(run: RunShape, hardware: Hardware, layout: Layout, mfu: float = DEFAULT_MFU,
             reserve_fixed: float = RESERVE_FIXED_BYTES) -> Plan:
    """Memory, communication and time of `run` on `hardware` with `layout` (advice not filled)."""
    model, tp, sp = run.model, layout.tp, layout.sp
    world = hardware.world_size
    if world % (tp * sp):
        raise PlanError("--tp", f"{world} GPUs do not split into tp x sp = {tp} x {sp}; "
                        "choose tp and sp whose product divides nodes x gpus-per-node")
    dp = world // (tp * sp)
    if run.seq_len % sp:
        raise PlanError("--sp", f"seq_len {run.seq_len} does not split into {sp} spans")
    samples = run.global_batch_tokens // run.seq_len
    if samples % (layout.micro_batch * dp):
        raise PlanError("--micro-batch", f"the global batch of {samples} samples does not split into "
                        f"micro batch {layout.micro_batch} x dp {dp}; choose a micro batch dividing "
                        f"{samples // dp if samples % dp == 0 else 'samples / dp'}")
    accumulation = samples // (layout.micro_batch * dp)
    span = run.seq_len // sp
    zero = layout.zero_stage
    facts = _facts(_key(model), tp)
    shard_over_sp = zero_partitions_over_sp(zero, sp)
    group = dp * sp if shard_over_sp else dp
    p = facts.parameters_per_tp_rank
    bf16 = run.precision == "bf16"
    weight_bytes = 2 if bf16 else 4
    bf16_optimizer = run.optimizer_precision == "bf16"
    master_bytes = 2 if bf16_optimizer else 4 if (bf16 or zero >= 1) else 0
    moment_bytes = 4 if bf16_optimizer else 8
    optimizer_divisor = group if zero >= 1 else 1
    # With sp > 1 the micro-steps' gradients accumulate at full size until one reduction after
    # the last backward (parallel/zero.py), whatever the stage.
    gradient_divisor = group if (zero >= 2 and sp == 1) else 1

    memory = [
        Term("parameters", p * weight_bytes / (group if zero == 3 else 1),
             f"P x {weight_bytes} B" + (" / N" if zero == 3 else "")),
        Term("gradients", p * weight_bytes / gradient_divisor,
             f"P x {weight_bytes} B" + (" / N" if gradient_divisor > 1 else
                                        " (full size: ZeRO < 2, or sp > 1 holds them until one reduction)")),
        Term("master weights", p * master_bytes / optimizer_divisor,
             f"P x {master_bytes} B" + (" / N" if zero >= 1 else "") + f" ({'bf16' if bf16_optimizer else 'fp32'} copy)"),
        Term("optimizer state", p * moment_bytes / optimizer_divisor,
             f"P x {moment_bytes} B (Adam m, v {'bf16' if bf16_optimizer else 'fp32'})" + (" / N" if zero >= 1 else "")),
    ]
    buckets = zero_buckets(model.dim, facts.layer_parameters_per_tp_rank, run.zero_bucket_elements)
    if zero >= 2 and sp == 1:
        bucket = min(buckets.reduce_bucket, p)
        memory.append(Term("gradient reduction bucket", bucket * weight_bytes,
                           f"min(reduce bucket {buckets.reduce_bucket:.3g}, P) x {weight_bytes} B"))
    if zero == 3:
        gathered = facts.layer_parameters_per_tp_rank + min(buckets.prefetch_bucket, p)
        memory.append(Term("ZeRO-3 gathered parameters", gathered * weight_bytes,
                           f"(one layer's P + min(prefetch bucket {buckets.prefetch_bucket:.3g}, P)) x {weight_bytes} B"))

    traced = _traced(_key(model), layout.micro_batch, span, sp, run.precision)
    layer = traced.layer.per_rank(tp, layout.tp_sequence_sharding)
    layer_input = traced.layer_input_bytes / (tp if layout.tp_sequence_sharding else 1)
    head = traced.head.per_rank(tp, layout.tp_sequence_sharding) + traced.logits_bytes / tp
    # The peak is where backward starts: every saved tensor is alive and the head's backward
    # begins (gradients then grow while activations are freed, layer by layer). With
    # checkpointing the recompute of the last layer can exceed the head's share instead.
    if layout.activation_checkpointing:
        memory.append(Term("activations (checkpointed)", model.n_layers * layer_input,
                           "L x B S D: the layer inputs the checkpoints keep"))
    else:
        memory.append(Term("activations", model.n_layers * layer,
                           "L x one layer's saved tensors (traced on the meta device)"))
    memory.append(Term("head activations", head,
                       "final norm, LM head, cross-entropy (traced) + B S V/tp x 4 B logits gradient"))
    if layout.activation_checkpointing:
        memory.append(Term("recompute beyond the head", max(0.0, layer + layer_input - head),
                           "max(0, one layer's saved tensors + its output gradient B S D - head activations)"))
    if sp > 1:
        relay = 2 * model.n_layers * relay_state_bytes(model, layout.micro_batch, (sp - 1) * span, tp, run.precision)
        memory.append(Term("relay state buffers", relay,
                           "2 x L x one layer's state (received, kept for backward; sent, in flight)"))

    # -- communication per optimizer step, bytes one GPU sends ---------------------------------
    act_bytes = weight_bytes
    comm: list[Term] = []
    if tp > 1:
        elements = tp_all_reduce_elements(model, facts, layout.micro_batch, span, layout.activation_checkpointing)
        kind = ("tp all-gather + reduce-scatter (sequence sharding)" if layout.tp_sequence_sharding
                else "tp all-reduce")
        comm.append(Term(kind, accumulation * elements * act_bytes * 2 * _ring(tp),
                         "a x (embedding + L x row outputs + L x column input gradients + head) x B S D "
                         "x 2 (tp-1)/tp (ring)"))
    if sp > 1:
        worst = max(relay_bytes_per_micro_step(model, layout.micro_batch, run.seq_len, tp, sp, r, run.precision)
                    for r in range(sp))
        comm.append(Term("sp state relay", accumulation * worst,
                         "a x L x (state forward + its gradient backward), busiest span owner"))
        if not shard_over_sp:
            comm.append(Term("sp gradient average", p * weight_bytes * 2 * _ring(sp),
                             "P x grad bytes x 2 (sp-1)/sp (ZeRO-3 under sp averages over sp first)"))
    if group > 1:
        if zero == 0:
            comm.append(Term("dp gradient all-reduce", p * weight_bytes * 2 * _ring(group),
                             "P x grad bytes x 2 (N-1)/N"))
        else:
            comm.append(Term("dp gradient reduce-scatter", p * weight_bytes * _ring(group),
                             "P x grad bytes x (N-1)/N"))
            gathers = 1 if zero < 3 else 2 * accumulation
            comm.append(Term("dp parameter all-gather", gathers * p * weight_bytes * _ring(group),
                             "P x param bytes x (N-1)/N" + (" x 2a (forward + backward, ZeRO-3)" if zero == 3
                                                           else " (after the step)")))

    # -- time ----------------------------------------------------------------------------------
    device = hardware.device
    model_flops = flops_per_token(model, run.seq_len) * run.global_batch_tokens / world
    compute = model_flops / (device.peak_bf16_flops * mfu)
    if layout.activation_checkpointing:
        compute *= 4 / 3  # one more forward (training = 3 forwards)
    idle = (sp - 1) / (model.n_layers + sp - 1)
    compute /= 1 - idle

    def bandwidth(span_of_group: int) -> float:
        return device.nvlink_bytes_per_s if span_of_group <= hardware.gpus_per_node else device.infiniband_bytes_per_s

    link = {"tp": bandwidth(tp), "sp": bandwidth(tp * sp), "dp": bandwidth(world if group > 1 else 1)}
    tp_seconds = sum(t.value for t in comm if t.name.startswith("tp")) / link["tp"]
    sp_seconds = sum(t.value for t in comm if t.name.startswith("sp")) / link["sp"]
    dp_seconds = sum(t.value for t in comm if t.name.startswith("dp")) / link["dp"]
    # sp = 1: gradient reduction overlaps the last micro-step's backward (2/3 of its compute);
    # ZeRO-3's gathers overlap all compute; under sp every reduction follows the backward.
    if sp > 1:
        exposed_dp = dp_seconds
    elif zero == 3:
        exposed_dp = max(0.0, dp_seconds - compute)
    else:
        exposed_dp = max(0.0, dp_seconds - compute / accumulation * 2 / 3)
    step = compute + tp_seconds + sp_seconds + exposed_dp
    tokens_per_s = run.global_batch_tokens / step
    achieved = model_flops / step / device.peak_bf16_flops
    time = [
        Term("model FLOPs per token", flops_per_token(model, run.seq_len), "titans_train.model.flops (fwd + bwd)"),
        Term("compute s", compute, f"FLOPs / (peak x MFU {mfu})" + (" x 4/3 (recompute)" if layout.activation_checkpointing else "")
             + (f" / (1 - wavefront idle {idle:.3f})" if sp > 1 else "")),
        Term("tp communication s", tp_seconds, "tp bytes / link (not overlapped)"),
        Term("sp communication s", sp_seconds, "relay bytes / link"),
        Term("dp communication s (exposed)", exposed_dp, f"of {dp_seconds:.3g} s at the dp link"),
        Term("step s", step, "compute + tp + sp + exposed dp"),
        Term("tokens per s", tokens_per_s, "global batch tokens / step"),
        Term("achieved MFU", achieved, "model FLOPs / (step x peak)"),
        Term("days to token budget", run.tokens / tokens_per_s / SECONDS_PER_DAY, f"{run.tokens:.3g} tokens / tokens per s"),
    ]
    budget = usable_bytes(device, reserve_fixed)
    plan = Plan(layout=layout, hardware=hardware, dp=dp, accumulation=accumulation, memory=memory,
                communication=comm, time=time, fits=False, usable_bytes=budget, facts=facts)
    plan.fits = plan.peak_bytes <= budget
    return plan


def run_shape(config) -> RunShape:
    """The planner's view of a resolved run config (`titans_train.config.load_recipe`)."""
    from titans_train.config import model_config

    train = config.train
    tokens = train.tokens or train.steps * train.global_batch_tokens
    return RunShape(model=model_config(config), seq_len=train.seq_len,
                    global_batch_tokens=train.global_batch_tokens, tokens=tokens, precision=train.precision,
                    optimizer_precision=train.optimizer_precision,
                    zero_bucket_elements=config.parallel.zero_bucket_elements)


def layout_of(config) -> Layout:
    """The layout a run config states."""
    parallel = config.parallel
    return Layout(tp=parallel.tp, sp=parallel.sp, zero_stage=parallel.zero_stage,
                  micro_batch=config.train.micro_batch_size,
                  activation_checkpointing=parallel.activation_checkpointing,
                  tp_sequence_sharding=parallel.tp_sequence_sharding and parallel.tp > 1)
