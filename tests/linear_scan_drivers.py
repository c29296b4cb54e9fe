"""Op-level sequence-parallel memory_scans for tests and benchmarks (never used in training).

`scan_memory_scan`: depth-1 memory, every span at once, the incoming states from an all-gather
of the spans' affine maps (`titans_train.kernels.memory_scan.span_map`); `relay_memory_scan`: any
depth, the state handed from span owner to span owner. Both must give one process's memory_scan.
The model-level schedules live in `titans_train.parallel` (relay and scan).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from titans_train.kernels import memory_scan
from titans_train.kernels.memory_scan.span_map import span_affine_map
from titans_train.parallel.context import ParallelContext
from titans_train.parallel.relay import StateRelay


class _ComposeIncoming(torch.autograd.Function):
    """This span's incoming state from every span's affine map: one all-gather forward, one
    all-reduce backward, on every rank (so the collectives always match, whatever each rank's
    loss uses).

    forward: gather (A_p, b_p) of all P spans, X_in = (...(X_0 A_0 + b_0) A_1 + b_1 ...) up to
    this rank. backward: this rank's cotangent of X_in gives cotangents of X_0 and of the maps of
    the spans before it; summed over ranks (all_reduce, gloo has no reduce_scatter), each rank
    keeps those of its own map.
    """

    @staticmethod
    def forward(ctx, linear, offset, initial, group, rank: int, size: int):
        packed = torch.cat([linear.reshape(-1), offset.reshape(-1)])
        gathered = [torch.empty_like(packed) for _ in range(size)]
        dist.all_gather(gathered, packed, group=group)
        split = linear.numel()
        all_linear = [g[:split].view(linear.shape) for g in gathered]
        all_offset = [g[split:].view(offset.shape) for g in gathered]
        state, states = initial, []
        for previous in range(rank):
            states.append(state)
            state = state @ all_linear[previous] + all_offset[previous]
        ctx.save_for_backward(*all_linear[:rank], *states)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        ctx.shapes = (linear.shape, offset.shape)
        return state

    @staticmethod
    def backward(ctx, grad_state):
        rank = ctx.rank
        saved = ctx.saved_tensors
        all_linear, states = saved[:rank], saved[rank:]
        linear_shape, offset_shape = ctx.shapes
        grad_linear = [grad_state.new_zeros(linear_shape) for _ in range(ctx.size)]
        grad_offset = [grad_state.new_zeros(offset_shape) for _ in range(ctx.size)]
        grad = grad_state
        for previous in reversed(range(rank)):
            grad_offset[previous] = grad
            grad_linear[previous] = states[previous].transpose(-1, -2) @ grad  # (B, H, 2d, 2d)
            grad = grad @ all_linear[previous].transpose(-1, -2)
        packed = torch.cat([t.reshape(-1) for t in grad_linear + grad_offset])
        dist.all_reduce(packed, group=ctx.group)
        linear_size = grad_linear[0].numel()
        offset_size = grad_offset[0].numel()
        own_linear = packed[rank * linear_size:(rank + 1) * linear_size].view(linear_shape)
        base = ctx.size * linear_size
        own_offset = packed[base + rank * offset_size: base + (rank + 1) * offset_size].view(offset_shape)
        return own_linear, own_offset, grad, None, None, None


def scan_memory_scan(q, k, v, theta, eta, alpha, weights, momentum, *, chunk_size: int,
                     retrieve: str = "token", residual: bool = True, context: ParallelContext):
    """memory_scan of a sequence whose spans are spread over the sp group, depth-1 memory only.

    Each rank passes its span (q, k, v (B, H, S, d), gates (B, H, S)) and the sequence's initial
    state (`weights`, `momentum`: one (B, H, d, d) tensor each, the same on every rank). Returns
    this span's y and the state after it (the last rank's is the sequence's final state).
    """
    if len(weights) != 1:
        raise ValueError(f"the scan over ranks needs a linear memory (memory_depth 1), got depth "
                         f"{len(weights)}; use relay_memory_scan (or the model's relay driver)")
    d = k.shape[-1]
    linear, offset = span_affine_map(k, v, theta, eta, alpha, chunk_size=chunk_size, residual=residual)
    initial = torch.cat([weights[0], momentum[0]], dim=-1)  # (B, H, d, 2d)
    state = _ComposeIncoming.apply(linear, offset, initial, context.sp_group, context.sp_rank,
                                   context.sp_size)
    incoming_weights, incoming_momentum = state[..., :d], state[..., d:]
    return memory_scan(q, k, v, theta, eta, alpha, (incoming_weights,), (incoming_momentum,),
                       chunk_size=chunk_size, retrieve=retrieve, residual=residual)


def relay_memory_scan(q, k, v, theta, eta, alpha, weights, momentum, *, chunk_size: int,
                      retrieve: str = "token", activation: str = "silu", residual: bool = True,
                      context: ParallelContext):
    """The same sequence-parallel memory_scan by handing the state along (any depth).

    Returns (y, state after this span, relay zero to add to the loss, relay to finish()).
    """
    relay = StateRelay(context.sp_previous_rank, context.sp_next_rank)
    anchor = torch.zeros((), dtype=q.dtype, device=q.device, requires_grad=True)
    depth = len(weights)
    if relay.previous_rank is not None:
        template = {f"weights.{i}": w for i, w in enumerate(weights)}
        template.update({f"momentum.{i}": s for i, s in enumerate(momentum)})
        received = relay.receive(template, anchor)
        weights = tuple(received[f"weights.{i}"] for i in range(depth))
        momentum = tuple(received[f"momentum.{i}"] for i in range(depth))
    y, (weights_out, momentum_out) = memory_scan(
        q, k, v, theta, eta, alpha, weights, momentum, chunk_size=chunk_size, retrieve=retrieve,
        activation=activation, residual=residual)
    relay_zero = anchor.new_zeros(())
    if relay.next_rank is not None:
        outgoing = {f"weights.{i}": w for i, w in enumerate(weights_out)}
        outgoing.update({f"momentum.{i}": s for i, s in enumerate(momentum_out)})
        relay_zero = relay.send(outgoing, anchor)
    return y, (weights_out, momentum_out), relay_zero, relay
