"""The chunked parallel form in plain PyTorch, differentiated by autograd (math: README.md here).

Per chunk, every per-token gradient is taken in closed form at the chunk-start weights; momentum and
forgetting enter through the decay matrices of `decays.py`; token retrieval is the layer-by-layer
dual form. The readable statement of the closed form, and the path for higher-order gradients;
`fused.py` computes the same with a hand-written backward.
"""

from __future__ import annotations

import torch

from .activations import activation_derivative
from .bound import surprise_scale
from .decays import ChunkDecays, chunk_decays
from .mlp import activate, memory_mlp


def _chunk(
    weights: list[torch.Tensor],
    momentum: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decays: ChunkDecays,
    retrieve: str,
    activation: str,
    residual: bool,
    surprise_bound: float,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One chunk of n tokens. weights/momentum: (G, d_out, d_in); q, k, v: (G, n, d); decays: (G, n[, n]).

    surprise_bound c > 0 scales each token's errors (every layer) by s_t = min(1, c / ||u_t||),
    computed without a graph: the bound is not differentiated.
    """
    depth = len(weights)
    # Store path at the chunk-start weights: layer inputs and the backpropagated errors.
    layer_inputs, pre_activations = [k], []
    hidden = k
    for layer, weight in enumerate(weights):
        hidden = hidden @ weight.mT
        if layer < depth - 1:
            pre_activations.append(hidden)
            hidden = activate(hidden, activation)
            layer_inputs.append(hidden)
    error = (hidden + k if residual else hidden) - v  # (G, n, d)
    errors = [error]
    for layer in range(depth - 2, -1, -1):
        error = (error @ weights[layer + 1]) * activation_derivative(pre_activations[layer], activation)
        errors.append(error)
    errors.reverse()  # errors[l]: (G, n, d_out of layer l); u_i^(l) = errors[l][i] layer_inputs[l][i]^T
    if surprise_bound > 0:
        with torch.no_grad():
            scale = surprise_scale(errors, layer_inputs, surprise_bound)  # (G, n, 1)
        errors = [error * scale for error in errors]

    if retrieve == "token":
        hidden = q
        weight_decay = decays.weight_decay.unsqueeze(-1)  # (G, n, 1)
        momentum_carry = decays.momentum_carry.unsqueeze(-1)
        for layer in range(depth):
            scores = decays.update_scores * (hidden @ layer_inputs[layer].mT)  # (G, n, n)
            hidden = (
                weight_decay * (hidden @ weights[layer].mT)
                + momentum_carry * (hidden @ momentum[layer].mT)
                - scores @ errors[layer]
            )
            if layer < depth - 1:
                hidden = activate(hidden, activation)
        y = hidden + q if residual else hidden
    else:
        y = memory_mlp(weights, q, activation, residual)

    last = -1
    weight_decay = decays.weight_decay[:, last, None, None]  # (G, 1, 1)
    momentum_carry = decays.momentum_carry[:, last, None, None]
    momentum_decay = decays.momentum_decay[:, last, None, None]
    update_row = decays.update_scores[:, last, :, None]  # (G, n, 1)
    momentum_row = decays.momentum_scores[:, last, :, None]
    new_weights, new_momentum = [], []
    for weight, mom, error, layer_input in zip(weights, momentum, errors, layer_inputs):
        new_weights.append(
            weight_decay * weight + momentum_carry * mom - error.mT @ (update_row * layer_input)
        )
        new_momentum.append(momentum_decay * mom - error.mT @ (momentum_row * layer_input))
    return y, new_weights, new_momentum


def chunked_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    weights: list[torch.Tensor],
    momentum: list[torch.Tensor],
    chunk_size: int,
    retrieve: str,
    activation: str,
    residual: bool,
    surprise_bound: float,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Kernel: trusts its inputs (one dtype, valid shapes, T >= 1). Shapes as `memory_scan`."""
    batch, heads, seq_len, dim = q.shape
    groups = batch * heads
    # One unbind per tensor, not an index per chunk: autograd then assembles the gradient once.
    decays = [x.flatten(0, 1).unbind(1) for x in chunk_decays(theta, eta, alpha, chunk_size)]
    q, k, v = (x.reshape(groups, seq_len, dim) for x in (q, k, v))
    weights = [w.reshape(groups, *w.shape[2:]) for w in weights]
    momentum = [s.reshape(groups, *s.shape[2:]) for s in momentum]
    outputs = []
    for index, start in enumerate(range(0, seq_len, chunk_size)):
        length = min(chunk_size, seq_len - start)
        tokens = slice(start, start + length)
        chunk_decay = ChunkDecays(
            *(x[index][:, :length, :length] if x[index].dim() == 3 else x[index][:, :length] for x in decays)
        )
        y, weights, momentum = _chunk(
            weights, momentum, q[:, tokens], k[:, tokens], v[:, tokens], chunk_decay,
            retrieve, activation, residual, surprise_bound,
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1).view(batch, heads, seq_len, dim)
    weights = [w.view(batch, heads, *w.shape[1:]) for w in weights]
    momentum = [s.view(batch, heads, *s.shape[1:]) for s in momentum]
    return y, weights, momentum

