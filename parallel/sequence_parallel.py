"""Sequence parallelism: each sp rank owns a contiguous span and the layer states travel between them.

Rank r of the sp group owns tokens [r*S, (r+1)*S) of every sequence (S = T / sp). For each layer
it receives that layer's state from r-1 (memory weights and momentum, conv tails, attention tail,
open block), runs the layer on its span and starts sending the outgoing state to r+1 before it
moves on to the next layer, so the ranks proceed as a wavefront (DESIGN section 6). Backward is
the same wavefront reversed: `relay.StateRelay` carries the gradient of each received state back
to its sender.

The model is driven through its layer-level API (`embed_tokens`, `layers[i](hidden, state,
position)`, `layers[i].empty_state(...)`, `final_logits`), so every variant works unchanged.

Loss and gradients: the loss is the mean over all tokens of all spans of all replicas. Each rank
back-propagates `sp * (sum of its span's token losses) / tokens_per_replica`; averaging the
parameter gradients over the gradient group (dp x sp, as DeepSpeed does with our mpu, or
`average_gradients` without it) then gives exactly the gradient of that mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from titans_train.parallel.context import ParallelContext
from titans_train.parallel.layout import ParallelConfigError
from titans_train.parallel.relay import StateRelay


class StepLoss(NamedTuple):
    """One rank's step loss. A NamedTuple: DeepSpeed's ZeRO-3 hooks find the tensors of a module's
    output only in tuples, lists and dicts (of another type they warn and skip its backward hooks)."""

    objective: torch.Tensor  # what this rank back-propagates (scaled, relay zeros included)
    loss: torch.Tensor  # detached: the mean token loss of the global batch (all replicas)
    relay: StateRelay  # call relay.finish() after backward (scan schedule: a RelayGroup, same use)
    # With return_telemetry: the model's per-layer memory statistics over this rank's span and
    # heads (detached scalars), else None.
    telemetry: dict[str, torch.Tensor] | None = None


def span_bounds(seq_len: int, context: ParallelContext) -> tuple[int, int]:
    """[start, stop) of the tokens this rank owns."""
    if seq_len % context.sp_size:
        raise ParallelConfigError(
            "parallel.sp",
            f"sequence length {seq_len} does not split into {context.sp_size} equal spans; "
            f"use a seq_len that is a multiple of parallel.sp (x chunk size, x segment length)",
        )
    span = seq_len // context.sp_size
    return context.sp_rank * span, (context.sp_rank + 1) * span


def zero3_partitioned(model) -> bool:
    """Whether ZeRO-3 partitions the model's parameters (they carry `ds_status`)."""
    return any(hasattr(p, "ds_status") for p in model.parameters())


def relay_anchor(model) -> torch.Tensor:
    """The 0-dim leaf the relay's autograd Functions hang on (see `relay.py`)."""
    parameter = next(model.parameters())
    return torch.zeros((), dtype=parameter.dtype, device=parameter.device, requires_grad=True)


def initial_state_zero(layer, batch: int, hidden: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero that uses every parameter of `layer`'s initial state (add it to the loss).

    Parameters that only shape the initial state (the memory's W^0) get no gradient on later
    spans; a zero-weighted use keeps every parameter in every rank's graph, which bucketed
    gradient reductions (ZeRO) need to stay in step across ranks.
    """
    zero = hidden.new_zeros(())
    for tensor in layer.initial_state(batch, hidden.device, hidden.dtype).values():
        if tensor.requires_grad:
            zero = zero + tensor.sum() * 0
    return zero


def span_step_loss(span_loss_sum: torch.Tensor, relay_zeros: torch.Tensor, relay,
                   context: ParallelContext, batch: int, seq_len: int,
                   telemetry: dict[str, torch.Tensor] | None) -> StepLoss:
    """This rank's objective from its span's summed token loss, and the global mean loss.

    The objective is `sp * span_loss_sum / tokens_per_replica` plus the relay zeros, so that
    averaging gradients over dp x sp gives the gradient of the global mean (module docstring).
    """
    objective = span_loss_sum * (context.sp_size / (batch * seq_len)) + relay_zeros
    total = span_loss_sum.detach().clone()
    if context.gradient_group is not None:
        dist.all_reduce(total, group=context.gradient_group)
    loss = total / (batch * seq_len * context.data_world_size)
    if telemetry:
        telemetry = replica_telemetry(telemetry, context)
    return StepLoss(objective=objective, loss=loss, relay=relay, telemetry=telemetry)


def replica_telemetry(telemetry: dict[str, torch.Tensor], context: ParallelContext) -> dict[str, torch.Tensor]:
    """The memory statistics of the whole replica from each rank's (its heads, its span).

    Every statistic is a mean over heads and tokens with equal counts on every tp and sp rank,
    so the mean over ranks is the replica's mean. `update_norm` is then the mean over spans of
    each span's change of the memory weights, not the change over the whole sequence.
    """
    keys = sorted(telemetry)  # the same memory layers on every rank
    values = torch.stack([telemetry[key].detach().float() for key in keys])
    for group, size in ((context.tp_group, context.tp_size), (context.sp_group, context.sp_size)):
        if size > 1:
            dist.all_reduce(values, group=group)
            values /= size
    return dict(zip(keys, values.unbind()))


def forward_span(model, input_ids: torch.Tensor, position: int, relay: StateRelay,
                 anchor: torch.Tensor, activation_checkpointing: bool = False,
                 telemetry: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of this rank's span (B, S, V_local), and the sum of the relay zeros (0-dim).

    `input_ids` (B, S) are the span's tokens, starting at absolute `position`. With activation
    checkpointing each layer's activations are recomputed in backward; the receive and send sit
    outside the recomputed region, so recomputation never communicates again.
    """
    batch = input_ids.shape[0]
    hidden = model.embed_tokens(input_ids)  # (B, S, D)
    relay_zeros = anchor.new_zeros(())
    # ZeRO-3 reduces gradients only among ranks at the same span position (parallel/zero.py), so
    # the initial state needs no place in later spans' graphs; its partitioned parameters cannot
    # be read outside their module's forward either.
    partitioned = zero3_partitioned(model)
    for layer in model.layers:
        if relay.previous_rank is None:
            incoming = None  # the first span starts from the layer's own initial state
        else:
            template = layer.empty_state(batch, position, hidden.device, hidden.dtype)
            incoming = relay.receive(template, anchor)
            if not partitioned:
                relay_zeros = relay_zeros + initial_state_zero(layer, batch, hidden)
        if activation_checkpointing and torch.is_grad_enabled() and telemetry is None:
            hidden, outgoing = checkpoint(layer, hidden, incoming, position, use_reentrant=False)
        else:
            hidden, outgoing = layer(hidden, incoming, position, telemetry)
        if relay.next_rank is not None:
            relay_zeros = relay_zeros + relay.send(outgoing, anchor)
        elif relay.previous_rank is not None and torch.is_grad_enabled():
            relay_zeros = relay_zeros + relay.discard(outgoing, anchor)
    return model.final_logits(hidden), relay_zeros


def sequence_parallel_loss(model, tokens: torch.Tensor, context: ParallelContext,
                           token_loss_fn, activation_checkpointing: bool = False,
                           return_telemetry: bool = False) -> StepLoss:
    """Forward of this rank's span of `tokens` (B, T+1): inputs tokens[:, :-1], labels [:, 1:].

    `token_loss_fn(logits, labels) -> (B, S)` per-token losses (vocab-parallel under tp).
    Every rank of a replica passes the same `tokens`; each takes its own span.
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    batch, seq_len = inputs.shape
    start, stop = span_bounds(seq_len, context)
    relay = StateRelay(context.sp_previous_rank, context.sp_next_rank)
    anchor = relay_anchor(model)
    telemetry = {} if return_telemetry else None
    logits, relay_zeros = forward_span(model, inputs[:, start:stop], start, relay, anchor,
                                       activation_checkpointing, telemetry)
    span_loss_sum = token_loss_fn(logits, labels[:, start:stop]).float().sum()
    return span_step_loss(span_loss_sum, relay_zeros, relay, context, batch, seq_len, telemetry)


def average_gradients(model, context: ParallelContext) -> None:
    """Mean of every parameter gradient over the gradient group (dp x sp): what ZeRO does too."""
    if context.gradient_group is None:
        return
    size = context.layout.dp * context.layout.sp
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:  # every rank must join every reduction, in the same order
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, group=context.gradient_group)
        parameter.grad.div_(size)
