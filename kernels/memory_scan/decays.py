"""Gate products of the chunked scan: everything that does not depend on the memory weights.

Computed for all chunks at once, as segment products over masked matrices (README.md here). The
reference of `cpu/gates.cpp`, which computes the same products row by row for the `cpp` kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def segment_product(values: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n, n) with out[t, j] = prod_{l=j+1..t} x_l for j <= t (1 on the diagonal), 0 above.

    A cumulative product over a masked repeated matrix, the multiplicative form of Mamba-2's
    `segsum`: no differences or ratios of prefix products, so a gate at exactly 0 gives exact
    zeros, and autograd's cumprod backward gives the exact derivative there too (README.md).
    """
    n = values.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=values.device)
    repeated = values.unsqueeze(-1).expand(*values.shape, n)  # (..., l, j) = x_l
    products = torch.where(ones.tril(-1), repeated, 1.0).cumprod(dim=-2)  # x_l for l > j, else 1
    return products.masked_fill(ones.triu(1), 0.0)


class ChunkDecays(NamedTuple):
    """Gate products of every chunk, (B, H, n_chunks, n[, n]); tokens t, i indexed within the chunk."""

    weight_decay: torch.Tensor  # A_t = prod_{l<=t} (1 - alpha_l)
    momentum_carry: torch.Tensor  # E_t = sum_{j<=t} D_alpha[t, j] P_j: weight of S^c in W_t
    update_scores: torch.Tensor  # C[t, i] theta_i: weight of u_i in W_t (lower-triangular)
    momentum_scores: torch.Tensor  # D_eta[t, i] theta_i: weight of u_i in S_t (lower-triangular)
    momentum_decay: torch.Tensor  # P_t = prod_{m<=t} eta_m


def chunk_decays(
    theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, chunk_size: int
) -> ChunkDecays:
    """All W-independent gate math, for all chunks at once. Gates (B, H, T).

    The sequence is padded to whole chunks with inert gates (theta 0, eta 1, alpha 0); decays are
    causal, so the padding never reaches a real token.
    """
    batch, heads, seq_len = theta.shape
    n_chunks = -(-seq_len // chunk_size)
    pad = n_chunks * chunk_size - seq_len

    def chunked(x: torch.Tensor, fill: float) -> torch.Tensor:
        return F.pad(x, (0, pad), value=fill).view(batch, heads, n_chunks, chunk_size)

    # A leading 1 stands for the chunk start: column 0 of the segment products is then the prefix
    # product from the chunk start.
    keep = F.pad(chunked(1 - alpha, 1.0), (1, 0), value=1.0)  # (B, H, nc, n + 1)
    decay_alpha = segment_product(keep)  # (B, H, nc, n + 1, n + 1)
    decay_eta = segment_product(F.pad(chunked(eta, 1.0), (1, 0), value=1.0))
    weight_decay = decay_alpha[..., 1:, 0]
    momentum_decay = decay_eta[..., 1:, 0]
    decay_alpha = decay_alpha[..., 1:, 1:]  # D_alpha[t, j] = prod_{l=j+1..t} (1 - alpha_l)
    decay_eta = decay_eta[..., 1:, 1:]  # D_eta[j, i] = prod_{m=i+1..j} eta_m
    theta_chunks = chunked(theta, 0.0).unsqueeze(-2)  # (B, H, nc, 1, n)
    momentum_carry = (decay_alpha @ momentum_decay.unsqueeze(-1)).squeeze(-1)
    update_scores = (decay_alpha @ decay_eta) * theta_chunks
    return ChunkDecays(
        weight_decay, momentum_carry, update_scores, decay_eta * theta_chunks, momentum_decay
    )


def last_rows(x: torch.Tensor, seq_len: int, chunk_size: int) -> torch.Tensor:
    """(B, H, nc, n, ...) -> (B, H, nc, ...): each chunk's row at its last real token, where the
    chunk's state update is read (the last chunk may be short)."""
    n_chunks = x.shape[2]
    last = torch.full((n_chunks,), chunk_size - 1, device=x.device)
    last[-1] = (seq_len - 1) % chunk_size
    return x[:, :, torch.arange(n_chunks, device=x.device), last]
