"""Apply parallelism onto a plain `TitansLM`, and compute the loss of one micro-batch under it.

The order, for a model built identically on every rank (same seed):
1. tensor parallelism: shard heads, vocabulary and MLP channels (`apply_tensor_parallel`), and
   with `parallel.tp_sequence_sharding` split the norm regions along the sequence over tp;
2. sequence parallelism needs no change to the model: `parallel_loss` drives it layer by layer;
3. ZeRO data parallelism: `deepspeed.initialize(model=..., mpu=context.mpu())`, by the trainer.

`parallel_loss(model, tokens, context)` is the one call a training step makes: every rank of a
replica passes the same (B, T+1) token block; it returns what to back-propagate, the mean loss of
the global batch, and the relay whose in-flight sends `finish()` completes after backward.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from titans_train.parallel.context import ParallelContext
from titans_train.parallel.scan_schedule import scan_schedule_loss
from titans_train.parallel.sequence_parallel import StepLoss, sequence_parallel_loss
from titans_train.parallel.tensor_parallel import apply_tensor_parallel, token_losses
from titans_train.parallel.tp_sequence_sharding import regather_norm_outputs
from titans_train.parallel.validation import validate_sp_schedule


def parallelize(model: nn.Module, parallel_config, context: ParallelContext) -> nn.Module:
    """Shard `model` in place for the layout of `context`.

    `parallel_config` is the run's `parallel` section (anything with `tp` and `sp`, optionally
    `tp_sequence_sharding` and `sp_schedule`); it must agree with the context the groups were
    built from. The sp schedule is recorded on the model (`model.sp_schedule`) for `parallel_loss`.
    """
    if parallel_config is not None:
        for key in ("tp", "sp"):
            expected = getattr(context.layout, key)
            if getattr(parallel_config, key) != expected:
                raise ValueError(f"parallel.{key} = {getattr(parallel_config, key)} but the "
                                 f"process groups were built with {key} = {expected}")
    sequence_sharding = bool(getattr(parallel_config, "tp_sequence_sharding", False))
    model.sp_schedule = getattr(parallel_config, "sp_schedule", "relay")
    validate_sp_schedule(model.config, model.sp_schedule)
    return apply_tensor_parallel(model, context, sequence_sharding=sequence_sharding)


def parallel_loss(model: nn.Module, tokens, context: ParallelContext,
                  activation_checkpointing: bool = False, return_telemetry: bool = False,
                  sp_schedule: str | None = None) -> StepLoss:
    """Loss of this replica's micro-batch `tokens` (B, T+1) under any (tp, sp) layout.

    `sp_schedule` (`parallel.sp_schedule`): "relay", the span owners' wavefront (any model), or
    "scan", all span owners in lockstep (linear memory in lmm/mag/mal; `scan_schedule.py`);
    None: the one `parallelize` recorded from the config (default "relay").
    """
    if sp_schedule is None:
        sp_schedule = getattr(model, "sp_schedule", "relay")
    tensor_parallel_size = getattr(model, "tensor_parallel_size", 1)
    if tensor_parallel_size != context.tp_size:
        raise RuntimeError(f"the model is sharded for tp = {tensor_parallel_size}, the context has "
                           f"tp = {context.tp_size}; call parallelize(model, ...) first")

    def loss_fn(logits, labels):
        return token_losses(logits, labels, tensor_parallel_size)

    # tp sequence sharding: gathered norm outputs are kept for backward as their T-shards.
    saving = regather_norm_outputs() if getattr(model, "tp_sequence_sharding", False) else nullcontext()
    with saving:
        if sp_schedule == "scan" and context.sp_size > 1:
            return scan_schedule_loss(model, tokens, context, loss_fn, activation_checkpointing,
                                      return_telemetry)
        validate_sp_schedule(model.config, sp_schedule)  # an unknown name is an error at any sp
        return sequence_parallel_loss(model, tokens, context, loss_fn, activation_checkpointing,
                                      return_telemetry)


class ParallelObjective(nn.Module):
    """The module DeepSpeed wraps under tp/sp: `forward(tokens) -> StepLoss`.

    Training step: `step = engine(tokens); engine.backward(step.objective); step.relay.finish();
    engine.step()`; log `step.loss`. DeepSpeed's data-parallel world is dp x sp (the mpu), so its
    `train_batch_size` is micro_batch x accumulation x dp x sp even though the sp ranks of a
    replica share their samples.
    """

    def __init__(self, model: nn.Module, context: ParallelContext,
                 activation_checkpointing: bool = False, sp_schedule: str | None = None):
        super().__init__()
        self.model = model
        self.context = context
        self.activation_checkpointing = activation_checkpointing
        self.sp_schedule = sp_schedule

    def forward(self, tokens, return_telemetry: bool = False) -> StepLoss:
        return parallel_loss(self.model, tokens, self.context, self.activation_checkpointing,
                             return_telemetry, self.sp_schedule)
