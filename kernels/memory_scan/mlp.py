"""The memory model M_W: an MLP on R^d applied per (batch, head), column-vector weights (d_out, d_in)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def memory_mlp(
    weights: Sequence[torch.Tensor], x: torch.Tensor, activation: str, residual: bool
) -> torch.Tensor:
    """M_W(x). weights: L_M tensors (B, H, d_out, d_in); x: (B, H, N, d) -> (B, H, N, d)."""
    hidden = x
    for layer, weight in enumerate(weights):
        hidden = hidden @ weight.transpose(-1, -2)  # (B, H, N, d_out)
        if layer < len(weights) - 1:
            hidden = activate(hidden, activation)
    return hidden + x if residual else hidden
