"""The sequential oracle for `memory_scan`: a literal token loop, for tests only.

Each per-token gradient u_t is taken with autograd at the chunk-start weights, so this file shares
no math with the chunked implementation beyond the memory MLP's forward pass.
"""

from __future__ import annotations

import torch

from .mlp import memory_mlp


def memory_scan_sequential(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    momentum: tuple[torch.Tensor, ...],
    *,
    chunk_size: int,
    retrieve: str = "token",
    activation: str = "silu",
    residual: bool = True,
    surprise_bound: float = 0.0,
) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Token-by-token reference of DESIGN section 3. Same signature and result as `memory_scan`.

    q, k, v: (B, H, T, d); theta, eta, alpha: (B, H, T); weights, momentum: L_M tensors (B, H, d_out, d_in).
    Returns y (B, H, T, d) and the final (weights, momentum). surprise_bound c > 0 replaces each
    token's gradient u_t (all layers) by s_t u_t, s_t = min(1, c / ||u_t||) taken from the autograd
    gradients under no_grad (not differentiated).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if retrieve not in ("token", "chunk"):
        raise ValueError(f"retrieve must be 'token' or 'chunk', got {retrieve!r}")
    seq_len = q.shape[2]
    weights = list(weights)
    momentum = list(momentum)
    outputs = []
    with torch.enable_grad():
        for t in range(seq_len):
            if t % chunk_size == 0:
                chunk_start_weights = [
                    w if w.requires_grad else w.detach().requires_grad_() for w in weights
                ]
            prediction = memory_mlp(chunk_start_weights, k[:, :, t : t + 1], activation, residual)
            # Summing over batch and heads is harmless: each (b, h) weight only touches its own term.
            inner_loss = 0.5 * (prediction - v[:, :, t : t + 1]).pow(2).sum()
            grads = torch.autograd.grad(inner_loss, chunk_start_weights, create_graph=True)
            if surprise_bound > 0:
                with torch.no_grad():
                    norm = sum(g.pow(2).sum((-2, -1)) for g in grads).sqrt()  # (B, H)
                    scale = torch.where(norm > surprise_bound, surprise_bound / norm, torch.ones_like(norm))
                grads = [g * scale[:, :, None, None] for g in grads]
            eta_t = eta[:, :, t, None, None]
            theta_t = theta[:, :, t, None, None]
            keep_t = 1 - alpha[:, :, t, None, None]
            momentum = [eta_t * s - theta_t * g for s, g in zip(momentum, grads)]
            weights = [keep_t * w + s for w, s in zip(weights, momentum)]
            retrieval_weights = weights if retrieve == "token" else chunk_start_weights
            outputs.append(memory_mlp(retrieval_weights, q[:, :, t : t + 1], activation, residual))
    y = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape)
    return y, (tuple(weights), tuple(momentum))
