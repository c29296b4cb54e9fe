"""The C++ chunk loop as an autograd.Function: fused.py's structure and layout, the loop in `memory_scan.cpp`."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..fused import run_chunk_function
from .build import extension


class CppChunkedScan(torch.autograd.Function):
    """As `fused.FusedChunkedScan`: q, k, v (G, T, d); gates with a chunk dim after G; states L x (G, d_out, 2, d_in).

    The extension returns every intermediate in a fixed number of whole-sequence buffers, which all
    go through save_for_backward (saved-tensor hooks, so activation checkpointing, see them).
    """

    @staticmethod
    def forward(ctx, options, q, k, v, retrieval_decays, update_scores, state_decays, state_rows, *states):
        chunk_size, activation, residual, token_retrieval, keep_saved = options
        gates = (retrieval_decays, update_scores, state_decays, state_rows)
        y, *rest = extension().forward(
            q, k, v, *gates, list(states), chunk_size, activation, residual, token_retrieval, keep_saved
        )
        states_out, saved = rest[: len(states)], rest[len(states):]
        ctx.options = options
        ctx.save_for_backward(q, k, *gates, *saved)
        return (y, *states_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_states):
        chunk_size, activation, residual, token_retrieval, _ = ctx.options
        q, k, *rest = ctx.saved_tensors  # read once: checkpointing's hooks unpack each tensor only once
        gates, saved = rest[:4], rest[4:]
        # Own, writable buffers: the backward computes the state gradients in place.
        grad_states = [grad.clone(memory_format=torch.contiguous_format) for grad in grad_states]
        grads = extension().backward(
            saved, q, k, *gates, grad_y, grad_states, chunk_size, activation, residual, token_retrieval
        )
        return (None, *grads)


def cpp_scan(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual):
    """Kernel: trusts its inputs (one dtype, valid shapes, T >= 1). Shapes as `memory_scan`."""
    return run_chunk_function(
        CppChunkedScan, q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual
    )
