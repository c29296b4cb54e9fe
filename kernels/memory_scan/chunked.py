"""The chunked parallel form of `memory_scan` in plain PyTorch (math: README.md in this folder).

Per chunk, every per-token gradient is taken in closed form at the chunk-start weights; momentum and
forgetting enter through lower-triangular decay matrices built in log space for all chunks at once;
token retrieval is the layer-by-layer dual form. Gradients come from autograd through these ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .mlp import ACTIVATIONS, activate, memory_mlp

RETRIEVE_MODES = ("token", "chunk")


def activation_derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(x) from differentiable ops, so the outer backward can take act''."""
    if activation == "silu":
        gate = torch.sigmoid(x)
        return gate * (1 + x * (1 - gate))
    # Exact (erf) gelu: Phi(x) + x * phi(x).
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return cdf + x * pdf


def segment_sum(log_values: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n, n) with out[t, j] = sum_{l=j+1..t} x_l for j <= t and -inf above the diagonal.

    Summed over a masked repeated matrix (as Mamba-2's `segsum`), never as a difference of two
    cumulative sums: a -inf term (a gate saturated to 0) stays -inf instead of giving inf - inf.
    """
    n = log_values.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=log_values.device)
    repeated = log_values.unsqueeze(-1).expand(*log_values.shape, n)  # (..., l, j) = x_l
    sums = repeated.masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)  # keeps x_l for l > j
    return sums.masked_fill(ones.triu(1), -math.inf)


def log_gate(gate: torch.Tensor) -> torch.Tensor:
    """log(gate), floored at the dtype's smallest normal number.

    A gate saturated to exactly 0 then decays by ~1e-38 (fp32) instead of exactly 0, and its
    gradient is 0 instead of 0 * inf = NaN. A sigmoid gate has zero slope there anyway.
    """
    return torch.log(gate.clamp_min(torch.finfo(gate.dtype).tiny))


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

    # A leading 0 in log space stands for the chunk start: column 0 of the segment sums is then the
    # prefix product from the chunk start.
    log_keep = F.pad(chunked(log_gate(1 - alpha), 0.0), (1, 0))  # (B, H, nc, n + 1)
    log_eta = F.pad(chunked(log_gate(eta), 0.0), (1, 0))
    decay_alpha = segment_sum(log_keep).exp()  # (B, H, nc, n + 1, n + 1)
    decay_eta = segment_sum(log_eta).exp()
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
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One chunk of n tokens. weights/momentum: (G, d_out, d_in); q, k, v: (G, n, d); decays: (G, n[, n])."""
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
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The kernel: trusts its inputs (one dtype, valid shapes, T >= 1)."""
    batch, heads, seq_len, dim = q.shape
    groups = batch * heads
    decays = chunk_decays(theta, eta, alpha, chunk_size)
    decays = ChunkDecays(*(x.flatten(0, 1) for x in decays))  # (G, nc, ...)
    q, k, v = (x.reshape(groups, seq_len, dim) for x in (q, k, v))
    weights = [w.reshape(groups, *w.shape[2:]) for w in weights]
    momentum = [s.reshape(groups, *s.shape[2:]) for s in momentum]
    outputs = []
    for index, start in enumerate(range(0, seq_len, chunk_size)):
        length = min(chunk_size, seq_len - start)
        tokens = slice(start, start + length)
        chunk_decay = ChunkDecays(
            *(x[:, index, :length, :length] if x.dim() == 4 else x[:, index, :length] for x in decays)
        )
        y, weights, momentum = _chunk(
            weights, momentum, q[:, tokens], k[:, tokens], v[:, tokens], chunk_decay,
            retrieve, activation, residual,
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1).view(batch, heads, seq_len, dim)
    weights = [w.view(batch, heads, *w.shape[1:]) for w in weights]
    momentum = [s.view(batch, heads, *s.shape[1:]) for s in momentum]
    return y, weights, momentum


def _check_inputs(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if retrieve not in RETRIEVE_MODES:
        raise ValueError(f"retrieve must be one of {RETRIEVE_MODES}, got {retrieve!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, T, d), got {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"{name} must have shape (B, H, T) = {tuple(q.shape[:3])}, got {tuple(x.shape)}"
            )
    weights, momentum = tuple(weights), tuple(momentum)
    if len(weights) < 1:
        raise ValueError("weights must hold at least one layer (memory depth >= 1)")
    if len(momentum) != len(weights):
        raise ValueError(
            f"momentum must have one tensor per layer: {len(weights)} weights, {len(momentum)} momentum"
        )
    batch, heads, _, dim = q.shape
    in_features = dim
    for layer, (weight, mom) in enumerate(zip(weights, momentum)):
        if weight.dim() != 4 or weight.shape[:2] != (batch, heads) or weight.shape[3] != in_features:
            raise ValueError(
                f"weights[{layer}] must have shape (B, H, d_out, d_in) = ({batch}, {heads}, *, "
                f"{in_features}), got {tuple(weight.shape)}"
            )
        if mom.shape != weight.shape:
            raise ValueError(
                f"momentum[{layer}] must have the shape of weights[{layer}] {tuple(weight.shape)}, "
                f"got {tuple(mom.shape)}"
            )
        in_features = weight.shape[2]
    if in_features != dim:
        raise ValueError(
            f"the last layer must map back to d = {dim}: weights[-1] has d_out = {in_features}"
        )
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    if any(not x.is_floating_point() for x in tensors):
        raise ValueError("memory_scan needs floating-point inputs (fp32, fp64, bf16 or fp16)")
    if len({x.device for x in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(x.device) for x in tensors})}")


def memory_scan(
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
) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Titans neural memory over a sequence: update chunk by chunk, retrieve per token (DESIGN section 3).

    q, k, v: (B, H, T, d); theta, eta, alpha: (B, H, T) (inner learning rate, momentum, forgetting);
    weights, momentum: L_M >= 1 tensors (B, H, d_out, d_in), the state at the start of the sequence.
    Returns y (B, H, T, d) and the state after the last token (weights, momentum). The last chunk
    may be short and updates like any other. Half-precision inputs are computed in fp32 (fp64 if
    any input is fp64); y comes back in q's dtype and each state tensor in its input's dtype.
    """
    _check_inputs(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation)
    weights, momentum = tuple(weights), tuple(momentum)
    if q.shape[2] == 0:
        return q.clone(), (weights, momentum)
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    compute_dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    q_, k_, v_, theta_, eta_, alpha_ = (x.to(compute_dtype) for x in (q, k, v, theta, eta, alpha))
    y, weights_out, momentum_out = chunked_scan(
        q_, k_, v_, theta_, eta_, alpha_,
        [w.to(compute_dtype) for w in weights], [s.to(compute_dtype) for s in momentum],
        chunk_size, retrieve, activation, residual,
    )
    return y.to(q.dtype), (
        tuple(w.to(ref.dtype) for w, ref in zip(weights_out, weights)),
        tuple(s.to(ref.dtype) for s, ref in zip(momentum_out, momentum)),
    )
