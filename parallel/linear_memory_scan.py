"""Sequence-parallel memory_scan for linear memory (L_M = 1): a scan over span owners.

With a depth-1 memory the update of one chunk is affine in the chunk-start state: the inner
gradient u_t = (W k_t + [k_t] - v_t) k_t^T is affine in W, and S, W follow linearly. So is a whole
span's effect. Writing the state of a head as X = [W | S] (d x 2d), every row of X evolves by the
same linear map plus a row-specific constant:

    X_out = X_in A + b,     A (2d x 2d), b (d x 2d), both functions of the span's k, v and gates.

Rank r finds (A_r, b_r) of its span in closed form (`span_affine_map`: one map per chunk from the
gate products of the chunked scan, composed over the chunks; forward + backward 0.5x a span's
memory_scan at d = 16, 1.4x at d = 64 where the (2d)^3 products of the maps dominate).
`span_affine_map_reference` gets the same map by probing memory_scan with the incoming states
0, [I | 0] and [0 | I] (b = f(0), A = [f([I|0]) - b ; f([0|I]) - b]); it is the plain
reference the tests compare against, and loses accuracy in fp32 to the differences. All
ranks all-gather their maps, and rank r composes those of ranks 0..r-1 onto the initial state to
get its incoming state; then every span runs at once (`scan_memory_scan`). Against the relay
(`relay_memory_scan`: receive from r-1, scan, send to r+1) it trades a sequential chain of P spans
for the map and the span-scan plus one all-gather of P (2d x 2d) maps per head; in a deep model
the relay's wavefront already hides most of the chain (idle fraction (P-1)/(L+P-1)).
`benchmarks/parallel.py` measures both.

This is the op-level building block (DESIGN section 6). The model-level lockstep schedule
(`scan_schedule.py`, `parallel.sp_schedule = "scan"`) uses `span_affine_map` with a chain of
point-to-point hops instead of the all-gather (see there why).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titans_train.kernels import memory_scan
from titans_train.kernels.memory_scan.decays import chunk_decays
from titans_train.parallel.context import ParallelContext
from titans_train.parallel.relay import StateRelay


class _ComposeIncoming(torch.autograd.Function):
    """This span's incoming state from every span's affine map: one all-gather forward, one
    all-reduce backward, on every rank (so the collectives always match, whatever each rank's
    loss uses).

    forward: gather (A_p, b_p) of all P spans, X_in = (...(X_0 A_0 + b_0) A_1 + b_1 ...) up to
    this rank. backward: this rank's cotangent of X_in gives cotangents of X_0 and of the maps of
    the spans before it; summed over ranks (all_reduce, gloo has no reduce_scatter), each rank
    keeps those of its own map.
    """

    @staticmethod
    def forward(ctx, linear, offset, initial, group, rank: int, size: int):
        packed = torch.cat([linear.reshape(-1), offset.reshape(-1)])
        gathered = [torch.empty_like(packed) for _ in range(size)]
        dist.all_gather(gathered, packed, group=group)
        split = linear.numel()
        all_linear = [g[:split].view(linear.shape) for g in gathered]
        all_offset = [g[split:].view(offset.shape) for g in gathered]
        state, states = initial, []
        for previous in range(rank):
            states.append(state)
            state = state @ all_linear[previous] + all_offset[previous]
        ctx.save_for_backward(*all_linear[:rank], *states)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        ctx.shapes = (linear.shape, offset.shape)
        return state

    @staticmethod
    def backward(ctx, grad_state):
        rank = ctx.rank
        saved = ctx.saved_tensors
        all_linear, states = saved[:rank], saved[rank:]
        linear_shape, offset_shape = ctx.shapes
        grad_linear = [grad_state.new_zeros(linear_shape) for _ in range(ctx.size)]
        grad_offset = [grad_state.new_zeros(offset_shape) for _ in range(ctx.size)]
        grad = grad_state
        for previous in reversed(range(rank)):
            grad_offset[previous] = grad
            grad_linear[previous] = states[previous].transpose(-1, -2) @ grad  # (B, H, 2d, 2d)
            grad = grad @ all_linear[previous].transpose(-1, -2)
        packed = torch.cat([t.reshape(-1) for t in grad_linear + grad_offset])
        dist.all_reduce(packed, group=ctx.group)
        linear_size = grad_linear[0].numel()
        offset_size = grad_offset[0].numel()
        own_linear = packed[rank * linear_size:(rank + 1) * linear_size].view(linear_shape)
        base = ctx.size * linear_size
        own_offset = packed[base + rank * offset_size: base + (rank + 1) * offset_size].view(offset_shape)
        return own_linear, own_offset, grad, None, None, None


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
    # Each chunk's state is read at its last real token (the last chunk may be short).
    last = torch.full((n_chunks,), chunk_size - 1, device=k.device)
    last[-1] = (seq_len - 1) % chunk_size
    chunks = torch.arange(n_chunks, device=k.device)
    weight_scores = decays.update_scores[:, :, chunks, last]  # (B, H, nc, n): c_i
    momentum_scores = decays.momentum_scores[:, :, chunks, last]  # m_i
    keys = F.pad(k, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk_size))  # (B, H, nc, n, d)
    errors = F.pad((k if residual else 0) - v, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk_size))
    scores = torch.stack([weight_scores, momentum_scores], dim=3)  # (B, H, nc, 2, n)
    grams = torch.einsum("bhcsi,bhcid,bhcie->bhcsde", scores, keys, keys)  # (B, H, nc, 2, d, d)
    constants = torch.einsum("bhcsi,bhcid,bhcie->bhcsde", scores, errors, keys)
    identity = torch.eye(d, dtype=k.dtype, device=k.device)

    def scaled(x):  # (B, H, nc) -> (B, H, nc, d, d)
        return x[..., None, None] * identity

    weight_decay = decays.weight_decay[:, :, chunks, last]
    momentum_carry = decays.momentum_carry[:, :, chunks, last]
    momentum_decay = decays.momentum_decay[:, :, chunks, last]
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


def scan_memory_scan(q, k, v, theta, eta, alpha, weights, momentum, *, chunk_size: int,
                     retrieve: str = "token", residual: bool = True, context: ParallelContext):
    """memory_scan of a sequence whose spans are spread over the sp group, depth-1 memory only.

    Each rank passes its span (q, k, v (B, H, S, d), gates (B, H, S)) and the sequence's initial
    state (`weights`, `momentum`: one (B, H, d, d) tensor each, the same on every rank). Returns
    this span's y and the state after it (the last rank's is the sequence's final state).
    """
    if len(weights) != 1:
        raise ValueError(f"the scan over ranks needs a linear memory (memory_depth 1), got depth "
                         f"{len(weights)}; use relay_memory_scan (or the model's relay driver)")
    d = k.shape[-1]
    linear, offset = span_affine_map(k, v, theta, eta, alpha, chunk_size=chunk_size, residual=residual)
    initial = torch.cat([weights[0], momentum[0]], dim=-1)  # (B, H, d, 2d)
    state = _ComposeIncoming.apply(linear, offset, initial, context.sp_group, context.sp_rank,
                                   context.sp_size)
    incoming_weights, incoming_momentum = state[..., :d], state[..., d:]
    return memory_scan(q, k, v, theta, eta, alpha, (incoming_weights,), (incoming_momentum,),
                       chunk_size=chunk_size, retrieve=retrieve, residual=residual)


def relay_memory_scan(q, k, v, theta, eta, alpha, weights, momentum, *, chunk_size: int,
                      retrieve: str = "token", activation: str = "silu", residual: bool = True,
                      context: ParallelContext):
    """The same sequence-parallel memory_scan by handing the state along (any depth).

    Returns (y, state after this span, relay zero to add to the loss, relay to finish()).
    """
    relay = StateRelay(context.sp_previous_rank, context.sp_next_rank)
    anchor = torch.zeros((), dtype=q.dtype, device=q.device, requires_grad=True)
    depth = len(weights)
    if relay.previous_rank is not None:
        template = {f"weights.{i}": w for i, w in enumerate(weights)}
        template.update({f"momentum.{i}": s for i, s in enumerate(momentum)})
        received = relay.receive(template, anchor)
        weights = tuple(received[f"weights.{i}"] for i in range(depth))
        momentum = tuple(received[f"momentum.{i}"] for i in range(depth))
    y, (weights_out, momentum_out) = memory_scan(
        q, k, v, theta, eta, alpha, weights, momentum, chunk_size=chunk_size, retrieve=retrieve,
        activation=activation, residual=residual)
    relay_zero = anchor.new_zeros(())
    if relay.next_rank is not None:
        outgoing = {f"weights.{i}": w for i, w in enumerate(weights_out)}
        outgoing.update({f"momentum.{i}": s for i, s in enumerate(momentum_out)})
        relay_zero = relay.send(outgoing, anchor)
    return y, (weights_out, momentum_out), relay_zero, relay
