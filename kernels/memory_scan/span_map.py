"""The span affine map of a depth-1 memory: the whole effect of memory_scan on the state.

With a depth-1 memory the update of one chunk is affine in the chunk-start state: the inner
gradient u_t = (W k_t + [k_t] - v_t) k_t^T is affine in W, and S, W follow linearly. So is a whole
span's effect. Writing the state of a head as X = [W | S] (d x 2d), every row of X evolves by the
same linear map plus a row-specific constant:

    X_out = X_in A + b,     A (2d x 2d), b (d x 2d), both functions of the span's k, v and gates.

`span_affine_map` finds (A, b) in closed form from the chunked scan's own gate products
(`decays.py`, read at each chunk's last row as `fused.py` reads its state update), composed over
the chunks; forward + backward cost 0.5x a span's memory_scan at d = 16, 1.4x at d = 64 where
the (2d)^3 products of the maps dominate. `span_affine_map_reference` gets the same map by
probing memory_scan with the incoming states 0, [I | 0] and [0 | I]: the plain reference the
tests compare against (it loses accuracy in fp32 to the differences).

Sequence parallelism uses it to find every span owner's incoming state without waiting for the
spans before (`titans_train.parallel.scan_schedule`, `parallel.sp_schedule = "scan"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decays import chunk_decays, last_rows
from .scan import memory_scan


def span_affine_map(k, v, theta, eta, alpha, *, chunk_size: int, residual: bool):
    """(A, b) of a span for depth-1 memory: X_out = X_in A + b with X = [W | S] per (batch, head).

    k, v (B, H, S, d); gates (B, H, S). Returns A (B, H, 2d, 2d), b (B, H, d, 2d).

    Closed form per chunk, then composed over the chunks. A chunk starting at (W, S) with every
    inner gradient taken at W, u_i = W k_i k_i^T + (r k_i - v_i) k_i^T (r = 1 with `residual`),
    ends at (DESIGN section 3, gate products from `chunk_decays`, last row of the chunk):

        W' = W (a I - sum_i c_i k_i k_i^T) + s S - sum_i c_i (r k_i - v_i) k_i^T
        S' = W (   - sum_i m_i k_i k_i^T) + e S - sum_i m_i (r k_i - v_i) k_i^T

    with a = prod (1 - alpha), e = prod eta, s the momentum's carry into W, c_i = C[last, i]
    theta_i and m_i = D_eta[last, i] theta_i. So A_chunk = [[a I - M_c, -M_m], [s I, e I]] and
    b_chunk = [-N_c, -N_m]; the span's map is their product in order (a pairwise tree). Checked
    against `span_affine_map_reference` (three memory_scan runs), forward and backward.
    """
    batch, heads, seq_len, d = k.shape
    decays = chunk_decays(theta, eta, alpha, chunk_size)
    n_chunks = decays.weight_decay.shape[2]
    pad = n_chunks * chunk_size - seq_len

    def last_row(x):  # (B, H, nc, n, ...) -> (B, H, nc, ...), as the scan reads its state update
        return last_rows(x, seq_len, chunk_size)

    weight_scores = last_row(decays.update_scores)  # (B, H, nc, n): c_i
    momentum_scores = last_row(decays.momentum_scores)  # m_i
    keys = F.pad(k, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk_size))  # (B, H, nc, n, d)
    errors = F.pad((k if residual else 0) - v, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk_size))
    scores = torch.stack([weight_scores, momentum_scores], dim=3)  # (B, H, nc, 2, n)
    grams = torch.einsum("bhcsi,bhcid,bhcie->bhcsde", scores, keys, keys)  # (B, H, nc, 2, d, d)
    constants = torch.einsum("bhcsi,bhcid,bhcie->bhcsde", scores, errors, keys)
    identity = torch.eye(d, dtype=k.dtype, device=k.device)

    def scaled(x):  # (B, H, nc) -> (B, H, nc, d, d)
        return x[..., None, None] * identity

    weight_decay = last_row(decays.weight_decay)
    momentum_carry = last_row(decays.momentum_carry)
    momentum_decay = last_row(decays.momentum_decay)
    linear = torch.cat([
        torch.cat([scaled(weight_decay) - grams[:, :, :, 0], -grams[:, :, :, 1]], dim=-1),
        torch.cat([scaled(momentum_carry), scaled(momentum_decay)], dim=-1),
    ], dim=-2)  # (B, H, nc, 2d, 2d)
    offset = -torch.cat([constants[:, :, :, 0], constants[:, :, :, 1]], dim=-1)  # (B, H, nc, d, 2d)
    return _compose_in_order(linear, offset)


def _compose_in_order(linear, offset):
    """The affine maps (A_i, b_i) along dim 2, applied in order: X -> (...(X A_0 + b_0) A_1 ...),
    by pairwise combination (log2 n levels of batched products). Returns A (B, H, 2d, 2d), b."""
    while linear.shape[2] > 1:
        if linear.shape[2] % 2:  # an identity map at the end keeps the pairs whole
            identity = torch.eye(linear.shape[-1], dtype=linear.dtype, device=linear.device)
            linear = torch.cat([linear, identity.expand_as(linear[:, :, :1])], dim=2)
            offset = torch.cat([offset, torch.zeros_like(offset[:, :, :1])], dim=2)
        first_linear, second_linear = linear[:, :, 0::2], linear[:, :, 1::2]
        linear = first_linear @ second_linear
        offset = offset[:, :, 0::2] @ second_linear + offset[:, :, 1::2]
    return linear[:, :, 0], offset[:, :, 0]


def span_affine_map_reference(k, v, theta, eta, alpha, *, chunk_size: int, residual: bool):
    """`span_affine_map` by probing memory_scan: the plain reference its tests compare against.

    Three runs batched together, from the incoming states 0, [I | 0] and [0 | I]:
    b = f(0), A = [f([I|0]) - b ; f([0|I]) - b].
    """
    batch, heads, _, d = k.shape
    zeros = k.new_zeros(batch, heads, d, d)
    identity = torch.eye(d, dtype=k.dtype, device=k.device).expand(batch, heads, d, d)
    # The three probe states along the batch: 0, [I | 0], [0 | I].
    weights_in = torch.cat([zeros, identity, zeros])  # (3B, H, d, d)
    momentum_in = torch.cat([zeros, zeros, identity])

    def three(x):
        return torch.cat([x, x, x])

    _, ((weights_out,), (momentum_out,)) = memory_scan(
        three(k), three(k), three(v), three(theta), three(eta), three(alpha),
        (weights_in,), (momentum_in,), chunk_size=chunk_size, retrieve="chunk",
        residual=residual,
    )
    states = torch.cat([weights_out, momentum_out], dim=-1).view(3, batch, heads, d, 2 * d)
    offset = states[0]
    linear = torch.cat([states[1] - offset, states[2] - offset], dim=-2)  # (B, H, 2d, 2d)
    return linear, offset
