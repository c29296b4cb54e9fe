"""The C++ chunk loop and gate products as autograd.Functions: fused.py's structure and layout, the
loop in `memory_scan.cpp`, `stacked_gates` in `gates.cpp`."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..fused import ChunkGates, chunk_function_inputs
from .build import extension


class CppStackedGates(torch.autograd.Function):
    """`fused.stacked_gates` for G = B * H groups: theta, eta, alpha (G, T) -> retrieval_decays (G, nc, n, 2),
    update_scores (G, nc, n, n), state_decays (G, nc, 3), state_rows (G, nc, n, 2), n = chunk_size.

    Only the gates are saved: the backward recomputes the products (O(n^2) per chunk, gates.cpp).
    """

    @staticmethod
    def forward(ctx, chunk_size, theta, eta, alpha):
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(theta, eta, alpha)
        return tuple(extension().gates_forward(theta, eta, alpha, chunk_size))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_gates):
        theta, eta, alpha = ctx.saved_tensors
        return (None, *extension().gates_backward(theta, eta, alpha, *grad_gates, ctx.chunk_size))


def cpp_stacked_gates(theta, eta, alpha, chunk_size):
    """`fused.stacked_gates` in one C++ op and one backward: gates (B, H, T) -> `ChunkGates` of (B, H, nc, ...)
    tensors, the same layout, padding and values (up to rounding: the sums run in another order)."""
    batch, heads, _ = theta.shape
    gates = CppStackedGates.apply(chunk_size, *(x.flatten(0, 1) for x in (theta, eta, alpha)))
    return ChunkGates(*(x.unflatten(0, (batch, heads)) for x in gates))


class CppChunkedScan(torch.autograd.Function):
    """As `fused.FusedChunkedScan` but with each layer's weights and momentum apart: q, k, v (G, T, d); gates
    with a chunk dim after G; then L weights and L momentum tensors (G, d_out, d_in), and out the same.

    The [W | S] state the loop works on is assembled and taken apart inside the C++ op (memory_scan.cpp).
    The extension returns every intermediate in a fixed number of whole-sequence buffers, which all
    go through save_for_backward (saved-tensor hooks, so activation checkpointing, see them).
    """

    @staticmethod
    def forward(ctx, options, q, k, v, retrieval_decays, update_scores, state_decays, state_rows, *states):
        chunk_size, activation, residual, token_retrieval, keep_saved, surprise_bound = options
        depth = len(states) // 2
        gates = (retrieval_decays, update_scores, state_decays, state_rows)
        y, *rest = extension().forward(
            q, k, v, *gates, list(states[:depth]), list(states[depth:]), chunk_size, activation, residual,
            token_retrieval, keep_saved, surprise_bound,
        )
        states_out, saved = rest[: len(states)], rest[len(states):]
        ctx.options = options
        ctx.save_for_backward(q, k, *gates, *saved)
        return (y, *states_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_states):
        chunk_size, activation, residual, token_retrieval, _, surprise_bound = ctx.options
        depth = len(grad_states) // 2
        q, k, *rest = ctx.saved_tensors  # read once: checkpointing's hooks unpack each tensor only once
        gates, saved = rest[:4], rest[4:]
        grads = extension().backward(
            saved, q, k, *gates, grad_y, list(grad_states[:depth]), list(grad_states[depth:]), chunk_size,
            activation, residual, token_retrieval, surprise_bound,
        )
        return (None, *grads)


def cpp_scan(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual,
             surprise_bound):
    """Kernel: trusts its inputs (one dtype, valid shapes, T >= 1). Shapes as `memory_scan`."""
    batch, heads, seq_len, dim = q.shape
    options, sequences, gates = chunk_function_inputs(
        cpp_stacked_gates, q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation,
        residual, surprise_bound)
    y, *states = CppChunkedScan.apply(options, *sequences, *gates, *(x.flatten(0, 1) for x in (*weights, *momentum)))
    states = [state.unflatten(0, (batch, heads)) for state in states]
    depth = len(weights)
    return y.view(batch, heads, seq_len, dim), states[:depth], states[depth:]
