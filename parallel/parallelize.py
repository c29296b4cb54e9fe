"""Apply parallelism onto a plain `TitansLM`, and compute the loss of one micro-batch under it.

`parallelize(model, parallel_config, context)` applies, in this order, to a model built
identically on every rank, or on the meta device (`parallel/construction.py`, which the trainer
uses, materialises only this rank's part afterwards):
1. tensor parallelism: shard heads, vocabulary and MLP channels (`apply_tensor_parallel`), and
   with `parallel.tp_sequence_sharding` split the norm regions along the sequence over tp;
2. sequence parallelism needs no change to the model: `parallel_loss` drives it layer by layer
   with the schedule the plan names (relay or scan);
3. activation checkpointing is a property of that drive (each layer recomputed in backward);
and returns the `ParallelPlan` that records all of it. ZeRO data parallelism comes last:
`deepspeed.initialize(model=ParallelObjective(model, plan), mpu=context.mpu())`
(`parallel/zero.py`).

Every layout goes through the same path, tp = sp = dp = 1 included (a world of one), so there is
one objective and one return type (`StepLoss`) for the trainer, evaluation and the tests.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

from torch import nn

from titans_train.parallel.context import ParallelContext
from titans_train.parallel.scan_schedule import scan_schedule_loss
from titans_train.parallel.sequence_parallel import StepLoss, sequence_parallel_loss
from titans_train.parallel.tensor_parallel import TP_PLAN, apply_tensor_parallel, padded_vocab_size, token_losses
from titans_train.parallel.tp_sequence_sharding import regather_norm_outputs


@dataclass(frozen=True)
class ParallelPlan:
    """How a built model is parallelised: what the loss, the engine and the checkpoints read.

    `tensor_parallel` maps every parameter path pattern to its split (`TP_PLAN`); with tp = 1
    nothing is split. `padded_vocab_size` is the vocabulary the embedding and head hold (a
    multiple of tp).
    """

    context: ParallelContext
    padded_vocab_size: int
    sequence_sharding: bool = False
    sp_schedule: str = "relay"
    activation_checkpointing: bool = False
    tensor_parallel: dict[str, str] = field(default_factory=lambda: dict(TP_PLAN))


def parallelize(model: nn.Module, parallel_config, context: ParallelContext) -> ParallelPlan:
    """Shard `model` in place for the layout of `context` and return its plan.

    `parallel_config` is the run's validated `parallel` section (None: every default, for
    tests); the context must have been built from the same tp and sp.
    """
    if parallel_config is None:
        from titans_train.config.schema import ParallelConfig

        parallel_config = ParallelConfig(tp=context.tp_size, sp=context.sp_size)
    sequence_sharding = bool(parallel_config.tp_sequence_sharding) and context.tp_size > 1
    apply_tensor_parallel(model, context, TP_PLAN, sequence_sharding=sequence_sharding)
    return ParallelPlan(
        context=context,
        padded_vocab_size=padded_vocab_size(model.config.vocab_size, context.tp_size),
        sequence_sharding=sequence_sharding,
        sp_schedule=parallel_config.sp_schedule,
        activation_checkpointing=bool(parallel_config.activation_checkpointing),
    )


def parallel_loss(model: nn.Module, tokens, plan: ParallelPlan, return_telemetry: bool = False,
                  sample_weights=None) -> StepLoss:
    """Loss of this replica's micro-batch `tokens` (B, T+1) under the plan's layout.

    `sample_weights` (B,) scale each sample's token losses (evaluation: 0 for padding samples,
    `titans_train.eval.distributed.padded_rounds`); None: every weight 1.

    Every rank of a replica passes the same tokens. The sp schedule: "relay", the span owners'
    wavefront (any model), or "scan", all span owners in lockstep (linear memory in lmm/mag/mal;
    `scan_schedule.py`).
    """
    context = plan.context

    def loss_fn(logits, labels):
        losses = token_losses(logits, labels, context.tp_size)
        return losses if sample_weights is None else losses * sample_weights[:, None]

    # tp sequence sharding: gathered norm outputs are kept for backward as their T-shards.
    saving = regather_norm_outputs() if plan.sequence_sharding else nullcontext()
    with saving:
        if plan.sp_schedule == "scan" and context.sp_size > 1:
            return scan_schedule_loss(model, tokens, context, loss_fn, return_telemetry)
        return sequence_parallel_loss(model, tokens, context, loss_fn, plan.activation_checkpointing,
                                      return_telemetry)


class ParallelObjective(nn.Module):
    """The module DeepSpeed wraps: `forward(tokens) -> StepLoss`, for every layout.

    Training step (`parallel.zero.optimizer_step`): `step = engine(tokens);
    engine.backward(step.objective); step.relay.finish(); engine.step()`; log `step.loss`.
    DeepSpeed's data-parallel world is dp x sp (the mpu), so its `train_batch_size` is
    micro_batch x accumulation x dp x sp even though the sp ranks of a replica share their samples.
    """

    def __init__(self, model: nn.Module, plan: ParallelPlan):
        super().__init__()
        self.model = model
        self.plan = plan

    def forward(self, tokens, return_telemetry: bool = False, sample_weights=None) -> StepLoss:
        return parallel_loss(self.model, tokens, self.plan, return_telemetry, sample_weights)
