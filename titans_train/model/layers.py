"""Building blocks: RMSNorm (whole vector and per head), RoPE, SwiGLU, the memory's causal conv features."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from titans_train.kernels import conv_features


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    batch, n_heads, seq_len, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, n_heads * head_dim)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Half-precision inputs are normalised in fp32; fp32/fp64 stay as they are.
    compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (compute * torch.rsqrt(compute.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's vector on its own, with a per-head weight (H, d).

    Input (B, T, H, d). No statistic crosses heads, so tensor-parallel shards need no reduction.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, d) of the rotary embedding (rotate-half convention) at absolute positions (T,).

    Angles are computed from absolute positions, so a token gets the same rotation however the
    sequence is split into calls (and a slice of the tables is the tables of the slice).
    """
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=angle_dtype) / head_dim)
    angles = positions.to(angle_dtype)[:, None] * inv_freq[None, :]  # (T, d/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    return cos, sin


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, H, T, d) rotated by `rope_tables` (cos, sin) of its T positions."""
    cos, sin = rope
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.down_proj.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CausalConv(nn.Module):
    """The neural memory's q, k or v features: SiLU of a causal depthwise conv1d over time with a
    carried tail, each head's `head_dim` channels L2-normalised when head_dim > 0 (q and k).

    weight (C, K): channels in the order of the projection feeding it (grouped by head). The tail
    (B, C, K-1) holds the last K-1 inputs before this call; zeros at the start of a sequence equal
    the zero padding of a single whole-sequence call, so splitting a sequence changes nothing.
    The arithmetic is `titans_train.kernels.conv_features` (a C++ op on CPU).
    """

    def __init__(self, channels: int, kernel_size: int, head_dim: int = 0):
        super().__init__()
        self.kernel_size = kernel_size
        self.head_dim = head_dim
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    @property
    def init_bound(self) -> float:
        return self.kernel_size ** -0.5  # PyTorch's Conv1d default for a depthwise kernel

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, -self.init_bound, self.init_bound)

    def outgoing_tail(self, x: torch.Tensor) -> torch.Tensor:
        """The tail `forward(x, tail)` leaves (B, C, K-1), from x (B, T, C) alone: it does not
        depend on the incoming tail once T >= K-1."""
        keep = self.kernel_size - 1
        if x.shape[1] < keep:
            raise ValueError(f"outgoing_tail needs at least kernel_size - 1 = {keep} steps, got "
                             f"{x.shape[1]}; the tail of a shorter input includes the incoming one")
        return x[:, x.shape[1] - keep:].transpose(1, 2)

    def forward(self, x: torch.Tensor, tail: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), tail (B, C, K-1) or None (start of sequence) -> features (B, T, C), new tail."""
        channels = self.weight.shape[0]
        if tail is None:
            tail = x.new_zeros(x.shape[0], channels, self.kernel_size - 1)
        padded = torch.cat([tail.transpose(1, 2), x], dim=1)  # (B, K-1+T, C)
        new_tail = padded[:, padded.shape[1] - (self.kernel_size - 1):].transpose(1, 2)
        return conv_features(padded, self.weight, self.head_dim), new_tail
