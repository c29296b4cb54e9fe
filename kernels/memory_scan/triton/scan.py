"""Launchers and the autograd Function around the Triton kernels (kernels.py; math: ../README.md)."""

from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable

from ..fused import stacked_gates
from .kernels import memory_scan_backward_kernel, memory_scan_forward_kernel

ACTIVATION_CODES = {"silu": 0, "gelu": 1}


def _block(size: int) -> int:
    """A power-of-two block of at least 16 (tl.dot's smallest tile) holding `size`."""
    return max(16, triton.next_power_of_2(size))


def _shape_constants(q, states, chunk_size, options):
    activation, residual, token_retrieval, surprise_bound = options
    groups, seq_len, dim = q.shape
    depth = len(states) // 2
    out1 = states[0].shape[1]
    hidden2 = states[2].shape[2] if depth == 2 else 1
    constants = dict(
        T=seq_len, D=dim, O1=out1, H2=hidden2, CHUNK=chunk_size, NC=-(-seq_len // chunk_size),
        B_N=_block(chunk_size), B_D=_block(dim), B_O1=_block(out1), B_H2=_block(hidden2),
        DEPTH=depth, TOKEN=token_retrieval, RESIDUAL=residual, ACT=ACTIVATION_CODES[activation],
        # fp32 inputs get exact fp32 products; half-precision inputs accept tf32 tensor-core products.
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BOUND=surprise_bound, BOUNDED=surprise_bound > 0,
    )
    return groups, constants


def _layer_pointers(states):
    """[W1, S1, W2, S2]; depth 1 repeats layer 1 in the unused layer-2 slots."""
    return list(states) if len(states) == 4 else [*states, *states]


class TritonChunkedScan(torch.autograd.Function):
    """q, k, v (G, T, d); gates (G, nc, ...) fp32 (`stacked_gates`); states W1, S1[, W2, S2] (G, d_out, d_in) fp32."""

    @staticmethod
    def forward(ctx, options, chunk_size, keep, q, k, v, rdec, scores, sdec, srows, *states):
        groups, constants = _shape_constants(q, states, chunk_size, options)
        y = torch.empty_like(q)
        states_out = [torch.empty_like(s) for s in states]
        # The chunk-start state of every chunk, read by the backward (G, nc, d_out, d_in); without
        # a backward to come (inference, decoding) nothing is saved and `states` stand in, unwritten.
        saved = [s.new_empty(groups, constants["NC"], *s.shape[1:]) for s in states] if keep else states
        memory_scan_forward_kernel[(groups,)](
            q, k, v, y, rdec, scores, sdec, srows,
            *_layer_pointers(states), *_layer_pointers(states_out), *_layer_pointers(saved),
            SAVE=keep, **constants,
        )
        ctx.options, ctx.chunk_size = options, chunk_size
        ctx.save_for_backward(q, k, v, rdec, scores, sdec, srows, *saved)
        return (y, *states_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_states):
        q, k, v, rdec, scores, sdec, srows, *saved = ctx.saved_tensors
        states = [s.new_empty(s.shape[0], *s.shape[2:]) for s in saved]  # (G, d_out, d_in) each
        groups, constants = _shape_constants(q, states, ctx.chunk_size, ctx.options)
        grad_states = [torch.zeros_like(s) if g is None else g.contiguous() for g, s in zip(grad_states, states)]
        grad_y = torch.zeros_like(q) if grad_y is None else grad_y.contiguous()
        grad_q, grad_k, grad_v = (torch.empty_like(x) for x in (q, k, v))
        grad_gates = [torch.zeros_like(x) for x in (rdec, scores, sdec, srows)]
        grad_initial = states  # written whole by the kernel
        memory_scan_backward_kernel[(groups,)](
            q, k, v, grad_y, grad_q, grad_k, grad_v, rdec, scores, sdec, srows, *grad_gates,
            *_layer_pointers(saved), *_layer_pointers(grad_states), *_layer_pointers(grad_initial),
            **constants,
        )
        return (None, None, None, grad_q, grad_k, grad_v, *grad_gates, *grad_initial)


def triton_scan(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual,
                surprise_bound):
    """Shapes as `memory_scan`; q, k, v in fp32, bf16 or fp16, gates and state fp32, depth 1 or 2.

    Returns y in q's dtype and the final state in fp32.
    """
    batch, heads, seq_len, dim = q.shape
    groups = batch * heads
    gates = stacked_gates(theta, eta, alpha, chunk_size)
    states = []
    for w, s in zip(weights, momentum):
        states += [w.flatten(0, 1).contiguous(), s.flatten(0, 1).contiguous()]
    options = (activation, residual, retrieve == "token", surprise_bound)
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    y, *states_out = TritonChunkedScan.apply(
        options, chunk_size, keep, *(x.reshape(groups, seq_len, dim).contiguous() for x in (q, k, v)),
        *(x.flatten(0, 1).contiguous() for x in gates), *states,
    )
    weights_out = [w.unflatten(0, (batch, heads)) for w in states_out[0::2]]
    momentum_out = [s.unflatten(0, (batch, heads)) for s in states_out[1::2]]
    return y.view(batch, heads, seq_len, dim), weights_out, momentum_out
