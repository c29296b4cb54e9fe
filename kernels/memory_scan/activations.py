"""The memory MLP's activations and their first and second derivatives (silu, exact erf gelu)."""

from __future__ import annotations

import math

import torch

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def activation_derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(x) from differentiable ops, so autograd through it yields act''."""
    return activation_with_derivative(x, activation)[1]


def activation_with_derivative(x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(x), act'(x)), sharing the sigmoid / erf between the two."""
    if activation == "silu":
        gate = torch.sigmoid(x)
        value = x * gate
        return value, gate + value * (1 - gate)  # s + x s (1 - s)
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, cdf + x * pdf


def activation_second_derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act''(x): silu'' = s (1 - s) (2 + x (1 - 2 s)); gelu'' = phi(x) (2 - x^2)."""
    if activation == "silu":
        gate = torch.sigmoid(x)
        return gate * (1 - gate) * (2 + x * (1 - 2 * gate))
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2 - x * x)
