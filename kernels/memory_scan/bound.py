"""The surprise bound of `memory_scan(surprise_bound=c)` (README.md here, "The surprise bound")."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def surprise_scale(errors: Sequence[torch.Tensor], layer_inputs: Sequence[torch.Tensor], bound: float) -> torch.Tensor:
    """s_t = min(1, c / ||u_t||) per token, u_t the surprise of all layers together.

    errors[l]: delta_l (G, n, d_out of layer l), layer_inputs[l]: a_{l-1} (G, n, d_in of layer l);
    u_t^(l) = delta_{l,t} a_{l-1,t}^T is rank one, so ||u_t||^2 = sum_l ||delta_{l,t}||^2 ||a_{l-1,t}||^2
    without forming it. Returns (G, n, 1); a zero surprise gets s = 1 (c / 0 = inf, clamped).
    The caller scales every layer's errors by it and does not differentiate it.
    """
    squared_norm = sum(e.square().sum(-1) * a.square().sum(-1) for e, a in zip(errors, layer_inputs))
    return (squared_norm.rsqrt() * bound).clamp_(max=1).unsqueeze(-1)
