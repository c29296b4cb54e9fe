"""The chunk loop as one autograd.Function with a hand-written backward (math: README.md here).

Same closed form as `chunked.py`, arranged for speed on CPU, where every extra pass over a tensor
costs about as much as a small matmul:
- each layer's weights and momentum live in one state tensor (G, d_out, 2, d_in), so that
  [A h, E h] @ [W | S]^T gives A h W^T + E h S^T in one product and delta^T [u a, m a] updates
  both in one product;
- matmul results accumulate in place (baddbmm), activations and their derivatives use the fused
  aten backward ops, the forward saves every intermediate the backward needs;
- the backward walks the chunks in reverse, carrying the gradient of the state.
First-order only: the backward is not itself differentiable (`chunked.chunked_scan` is).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from .activations import activation_second_derivative
from .bound import surprise_scale
from .decays import chunk_decays, last_rows


class ChunkGates(NamedTuple):
    """One chunk's gate products, G = B * H groups, n tokens (see `decays.ChunkDecays`)."""

    retrieval_decays: torch.Tensor  # (G, n, 2): [A_t, E_t], weights of W^c and S^c in W_t
    update_scores: torch.Tensor  # (G, n, n): C[t, i] theta_i
    state_decays: torch.Tensor  # (G, 3): [A_n, E_n, P_n]
    state_rows: torch.Tensor  # (G, n, 2): [C[n, i] theta_i, D_eta[n, i] theta_i]


class SavedChunk(NamedTuple):
    """What the backward of one chunk reads; lists hold one entry per layer l."""

    states: list  # (G, d_out, 2, d_in): the chunk-start weights and momentum
    layer_inputs: list  # (G, n, d_in): a_{l-1} of the store pass, a_0 = k
    pre_activations: list  # (G, n, width): z_l of the hidden layers
    carried: list  # (G, n, width): delta_{l+1} W_{l+1}, so delta_l = carried * act'(z_l) (scaled as errors)
    errors: list  # (G, n, d_out): delta_l, times the surprise scale s under a bound
    surprise_scales: list  # [(G, n, 1)]: s_t = min(1, c / ||u_t||) under a bound, else []
    retrieval_inputs: list  # (G, n, d_in): h_{l-1} of the retrieval pass, h_0 = q
    mixed_retrieval: list  # [A h, E h] (G, n, 2 d_in), or h [W | S]^T (G, n, d_out, 2) (token retrieval)
    grams: list  # (G, n, n): h a^T (token retrieval)
    scores: list  # (G, n, n): C theta * h a^T (token retrieval)
    mixed_update: list  # [c a, m a] (G, n, 2 d_in), or [c delta, m delta] (G, n, d_out, 2): the state update
    retrieval_pre_activations: list  # (G, n, width): r_l of the hidden retrieval layers


def _activate(x, activation):
    return F.silu(x) if activation == "silu" else F.gelu(x)


def _activation_backward(grad, x, activation):
    """grad * act'(x) in one fused op."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="none")


def _pair_combination(pair, weights, pair_dim):
    """pair.select(pair_dim, 0) * w_0 + pair.select(pair_dim, 1) * w_1, weights (G, n, 2) per token.

    pair (G, n, d, 2) with pair_dim -1, or (G, n, 2, d) with pair_dim -2 -> (G, n, d). Equals
    `(pair * weights).sum(pair_dim)` bit for bit (a sum of two terms), at a fraction of the time: a
    CPU reduction over a dim of size 2 runs element by element (2.5-4x slower measured).
    """
    first, second = pair.unbind(pair_dim)
    return first * weights[..., 0, None] + second * weights[..., 1, None]


def _minus_bmm(a, b):
    """-(a @ b) in one op (beta=0 ignores the uninitialised input)."""
    return torch.baddbmm(a.new_empty(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0, alpha=-1)


def _mix_outputs(state):
    """Apply the per-token decays on the output side of a layer when it is the narrower one.

    Both the retrieval's [A, E] and the update's [c, m] can scale either side of a product:
    diag(A) h W^T = diag(A) (h W^T), delta^T diag(c) a = (diag(c) delta)^T a. Scaling the
    narrower side moves the least memory; the layer's state layout (d_out, 2, d_in) serves both.
    """
    return state.shape[1] < state.shape[3]


def _forward_chunk(states, q, k, v, gates: ChunkGates, activation, residual, token_retrieval, surprise_bound):
    """states: L tensors (G, d_out, 2, d_in); q, k, v: (G, n, d). Returns y, next states, saved.

    Under a surprise bound the errors and carried terms of every layer are scaled by s (G, n, 1)
    once computed: the recursion delta_l = (delta_{l+1} W) * act'(z_l) is linear in delta_{l+1},
    so the scaled terms obey it too, and the backward needs s only where delta_L = out - v starts.
    """
    depth = len(states)
    groups, n, _ = q.shape
    layer_inputs, pre_activations = [k], []
    hidden = k
    for layer, state in enumerate(states):
        hidden = hidden @ state[:, :, 0].mT
        if layer < depth - 1:
            pre_activations.append(hidden)
            hidden = _activate(hidden, activation)
            layer_inputs.append(hidden)
    if residual:
        hidden += k
    error = hidden.sub_(v)  # the last layer's output is not needed again
    errors, carried = [error], []
    for layer in range(depth - 2, -1, -1):
        carry = error @ states[layer + 1][:, :, 0]
        error = _activation_backward(carry, pre_activations[layer], activation)
        carried.append(carry)
        errors.append(error)
    errors.reverse()
    carried.reverse()
    surprise_scales = []
    if surprise_bound > 0:
        scale = surprise_scale(errors, layer_inputs, surprise_bound)
        for term in (*errors, *carried):
            term.mul_(scale)
        surprise_scales.append(scale)

    retrieval_inputs, mixed_retrieval, grams, scores, retrieval_pre_activations = [], [], [], [], []
    hidden = q
    for layer, state in enumerate(states):
        _, d_out, _, d_in = state.shape
        retrieval_inputs.append(hidden)
        if token_retrieval:
            gram = hidden @ layer_inputs[layer].mT  # (G, n, n)
            score = gates.update_scores * gram
            if _mix_outputs(state):
                mixed = (hidden @ state.view(groups, 2 * d_out, d_in).mT).view(groups, n, d_out, 2)
                hidden = _pair_combination(mixed, gates.retrieval_decays, -1)
            else:
                mixed = (gates.retrieval_decays.unsqueeze(-1) * hidden.unsqueeze(-2)).view(groups, n, 2 * d_in)
                hidden = mixed @ state.view(groups, d_out, 2 * d_in).mT
            hidden.baddbmm_(score, errors[layer], alpha=-1)
            mixed_retrieval.append(mixed)
            grams.append(gram)
            scores.append(score)
        else:
            hidden = hidden @ state[:, :, 0].mT
        if layer < depth - 1:
            retrieval_pre_activations.append(hidden)
            hidden = _activate(hidden, activation)
    y = hidden + q if residual else hidden

    next_states, mixed_update = [], []
    keep = gates.state_decays[:, None, 0::2, None]  # (G, 1, 2, 1): [A_n, P_n]
    carry_momentum = gates.state_decays[:, 1, None, None]  # (G, 1, 1): E_n
    for layer, state in enumerate(states):
        _, d_out, _, d_in = state.shape
        next_state = state * keep
        next_state[:, :, 0].addcmul_(state[:, :, 1], carry_momentum)
        if _mix_outputs(state):
            mixed = errors[layer].unsqueeze(-1) * gates.state_rows.unsqueeze(-2)  # (G, n, d_out, 2)
            next_state.view(groups, 2 * d_out, d_in).baddbmm_(mixed.view(groups, n, 2 * d_out).mT, layer_inputs[layer], alpha=-1)
        else:
            mixed = (gates.state_rows.unsqueeze(-1) * layer_inputs[layer].unsqueeze(-2)).view(groups, n, 2 * d_in)
            next_state.view(groups, d_out, 2 * d_in).baddbmm_(errors[layer].mT, mixed, alpha=-1)
        next_states.append(next_state)
        mixed_update.append(mixed)
    saved = SavedChunk(
        list(states), layer_inputs, pre_activations, carried, errors, surprise_scales,
        retrieval_inputs, mixed_retrieval, grams, scores, mixed_update, retrieval_pre_activations,
    )
    return y, next_states, saved


def _backward_chunk(
    saved: SavedChunk, grad_y, grad_next, gates: ChunkGates, grad_qkv, grad_gates: ChunkGates,
    activation, residual, token_retrieval,
):
    """Gradients of one chunk's inputs from those of its outputs (y and the next states).

    Writes the gradients of q, k, v into `grad_qkv` and accumulates those of the gates into the
    zero-filled `grad_gates` (views of the whole-sequence buffers). The gradients of the states are
    computed in place in the buffers of `grad_next`, so one pair of buffers serves every chunk and
    stays in cache; they are returned.
    """
    states = saved.states
    depth = len(states)
    groups, n, _ = grad_y.shape
    grad_states, grad_errors, grad_inputs = [], [], []
    grad_state_decays = grad_y.new_zeros(groups, 2, 2)
    grad_state_rows = grad_gates.state_rows
    keep = gates.state_decays[:, None, 0::2, None]
    carry_momentum = gates.state_decays[:, 1, None, None]
    # The state update: next = [A_n W + E_n S, P_n S] - delta^T [C_n theta a, D_eta,n theta a].
    for layer, (state, grad) in enumerate(zip(states, grad_next)):
        _, d_out, _, d_in = state.shape
        # <grad_a, state_b> for a, b in {W, S}: (2 x d_in) @ (d_in x 2) per output row, summed.
        grad_state_decays += (grad.view(-1, 2, d_in) @ state.view(-1, 2, d_in).mT).view(groups, d_out, 2, 2).sum(1)
        grad_flat = grad.view(groups, d_out, 2 * d_in)
        layer_input = saved.layer_inputs[layer]
        mixed = saved.mixed_update[layer]
        if _mix_outputs(state):
            grad_rows_flat = grad.view(groups, 2 * d_out, d_in)
            grad_mixed = _minus_bmm(layer_input, grad_rows_flat.mT).view(groups, n, d_out, 2)
            grad_errors.append(_pair_combination(grad_mixed, gates.state_rows, -1))
            grad_state_rows += (grad_mixed * saved.errors[layer].unsqueeze(-1)).sum(-2)
            grad_inputs.append(_minus_bmm(mixed.view(groups, n, 2 * d_out), grad_rows_flat))
        else:
            grad_errors.append(_minus_bmm(mixed, grad_flat.mT))  # (G, n, d_out)
            grad_mixed = _minus_bmm(saved.errors[layer], grad_flat).view(groups, n, 2, d_in)
            grad_inputs.append(_pair_combination(grad_mixed, gates.state_rows, -2))
            grad_state_rows += (grad_mixed * layer_input.unsqueeze(-2)).sum(-1)
        # grad W^c = A_n grad W', grad S^c = P_n grad S' + E_n grad W', after every read of grad.
        grad[:, :, 1].mul_(keep[:, :, 1]).addcmul_(grad[:, :, 0], carry_momentum)
        grad[:, :, 0].mul_(keep[:, :, 0])
        grad_states.append(grad)

    grad_retrieval_decays = grad_gates.retrieval_decays
    grad_update_scores = grad_gates.update_scores
    grad_hidden = grad_y
    for layer in range(depth - 1, -1, -1):
        state = states[layer]
        _, d_out, _, d_in = state.shape
        if layer == depth - 1:
            grad_out = grad_hidden
        else:
            grad_out = _activation_backward(grad_hidden, saved.retrieval_pre_activations[layer], activation)
        hidden = saved.retrieval_inputs[layer]
        if token_retrieval:
            mixed = saved.mixed_retrieval[layer]
            if _mix_outputs(state):
                grad_retrieval_decays += (mixed * grad_out.unsqueeze(-1)).sum(-2)
                grad_mixed = (grad_out.unsqueeze(-1) * gates.retrieval_decays.unsqueeze(-2)).view(groups, n, 2 * d_out)
                grad_states[layer].view(groups, 2 * d_out, d_in).baddbmm_(grad_mixed.mT, hidden)
                grad_hidden = grad_mixed @ state.view(groups, 2 * d_out, d_in)
            else:
                grad_states[layer].view(groups, d_out, 2 * d_in).baddbmm_(grad_out.mT, mixed)
                grad_mixed = (grad_out @ state.view(groups, d_out, 2 * d_in)).view(groups, n, 2, d_in)
                grad_retrieval_decays += (grad_mixed * hidden.unsqueeze(-2)).sum(-1)
                grad_hidden = _pair_combination(grad_mixed, gates.retrieval_decays, -2)
            minus_grad_scores = grad_out @ saved.errors[layer].mT
            grad_errors[layer].baddbmm_(saved.scores[layer].mT, grad_out, alpha=-1)
            grad_update_scores.addcmul_(minus_grad_scores, saved.grams[layer], value=-1)
            minus_grad_gram = minus_grad_scores * gates.update_scores
            grad_hidden.baddbmm_(minus_grad_gram, saved.layer_inputs[layer], alpha=-1)
            grad_inputs[layer].baddbmm_(minus_grad_gram.mT, hidden, alpha=-1)
        else:
            grad_states[layer][:, :, 0].baddbmm_(grad_out.mT, hidden)
            grad_hidden = grad_out @ state[:, :, 0]
    grad_q, grad_k, grad_v = grad_qkv
    if residual:
        torch.add(grad_hidden, grad_y, out=grad_q)
    else:
        grad_q.copy_(grad_hidden)

    # The errors: delta_l = (delta_{l+1} W_{l+1}) * act'(z_l).
    grad_pre_activations = []
    for layer in range(depth - 1):
        grad_error = grad_errors[layer]
        pre_activation = saved.pre_activations[layer]
        grad_carry = _activation_backward(grad_error, pre_activation, activation)
        second = activation_second_derivative(pre_activation, activation)
        grad_pre_activations.append(second.mul_(grad_error).mul_(saved.carried[layer]))
        grad_errors[layer + 1].baddbmm_(grad_carry, states[layer + 1][:, :, 0].mT)
        grad_states[layer + 1][:, :, 0].baddbmm_(saved.errors[layer + 1].mT, grad_carry)

    # The store pass: out = M_W(k), delta_L = s (out - v) (s = 1 without a bound, not differentiated).
    grad_pre = grad_errors[-1]
    if saved.surprise_scales:
        grad_pre.mul_(saved.surprise_scales[0])
    torch.neg(grad_pre, out=grad_v)
    if residual:
        grad_k.copy_(grad_pre)
    for layer in range(depth - 1, -1, -1):
        weight = states[layer][:, :, 0]
        grad_states[layer][:, :, 0].baddbmm_(grad_pre.mT, saved.layer_inputs[layer])
        grad_input = grad_inputs[layer].baddbmm_(grad_pre, weight)
        if layer > 0:
            grad_pre = _activation_backward(grad_input, saved.pre_activations[layer - 1], activation)
            grad_pre += grad_pre_activations[layer - 1]
        elif residual:
            grad_k += grad_input
        else:
            grad_k.copy_(grad_input)
    grad_gates.state_decays.copy_(grad_state_decays.view(groups, 4)[:, [0, 1, 3]])  # A_n, E_n, P_n
    return grad_states


def _chunk_gates(gates: ChunkGates, index: int, length: int) -> ChunkGates:
    retrieval_decays, update_scores, state_decays, state_rows = gates
    return ChunkGates(
        retrieval_decays[:, index, :length],
        update_scores[:, index, :length, :length],
        state_decays[:, index],
        state_rows[:, index, :length],
    )


class FusedChunkedScan(torch.autograd.Function):
    """q, k, v (G, T, d); gates `ChunkGates` with a chunk dim after G; states L x (G, d_out, 2, d_in)."""

    @staticmethod
    def forward(ctx, options, q, k, v, retrieval_decays, update_scores, state_decays, state_rows, *states):
        chunk_size, activation, residual, token_retrieval, keep_saved, surprise_bound = options
        gates = ChunkGates(retrieval_decays, update_scores, state_decays, state_rows)
        seq_len = q.shape[1]
        outputs, saved_chunks = [], []
        for index, start in enumerate(range(0, seq_len, chunk_size)):
            tokens = slice(start, min(start + chunk_size, seq_len))
            y, states, saved = _forward_chunk(
                states, q[:, tokens], k[:, tokens], v[:, tokens],
                _chunk_gates(gates, index, tokens.stop - start), activation, residual, token_retrieval,
                surprise_bound,
            )
            outputs.append(y)
            if keep_saved:
                saved_chunks.append(saved)
        ctx.options = options
        # Every intermediate goes through save_for_backward (not a ctx attribute), so saved-tensor
        # hooks see it: activation checkpointing drops it after forward and recomputes it.
        saved_tensors, ctx.saved_layout = tree_flatten(saved_chunks)
        ctx.save_for_backward(retrieval_decays, update_scores, state_decays, state_rows, *saved_tensors)
        return (torch.cat(outputs, dim=1), *states)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_states):
        chunk_size, activation, residual, token_retrieval, _, _ = ctx.options
        saved = ctx.saved_tensors
        gates = ChunkGates(*saved[:4])
        saved_chunks = tree_unflatten(list(saved[4:]), ctx.saved_layout)
        grad_q, grad_k, grad_v = (torch.empty_like(grad_y) for _ in range(3))
        grad_gates = ChunkGates(*(torch.zeros_like(x) for x in gates))
        seq_len = grad_y.shape[1]
        # Own, writable buffers: the backward computes the state gradients in place.
        grad_states = [grad.clone(memory_format=torch.contiguous_format) for grad in grad_states]
        for index in range(len(saved_chunks) - 1, -1, -1):
            start = index * chunk_size
            tokens = slice(start, min(start + chunk_size, seq_len))
            length = tokens.stop - start
            grad_states = _backward_chunk(
                saved_chunks[index], grad_y[:, tokens], grad_states, _chunk_gates(gates, index, length),
                (grad_q[:, tokens], grad_k[:, tokens], grad_v[:, tokens]), _chunk_gates(grad_gates, index, length),
                activation, residual, token_retrieval,
            )
        return (None, grad_q, grad_k, grad_v, *grad_gates, *grad_states)


def stacked_gates(theta, eta, alpha, chunk_size):
    """The gate products in the layout both chunk kernels read, as `ChunkGates` of (B, H, nc, ...) tensors.

    retrieval_decays (B, H, nc, n, 2), update_scores (B, H, nc, n, n), state_decays (B, H, nc, 3),
    state_rows (B, H, nc, n, 2); n = chunk_size, the padding of a short last chunk is inert.
    """
    seq_len = theta.shape[2]
    decays = chunk_decays(theta, eta, alpha, chunk_size)

    def last_row(x):  # (B, H, nc, n, ...) -> (B, H, nc, ...)
        return last_rows(x, seq_len, chunk_size)

    retrieval_decays = torch.stack((decays.weight_decay, decays.momentum_carry), dim=-1)
    state_decays = torch.stack(
        (last_row(decays.weight_decay), last_row(decays.momentum_carry), last_row(decays.momentum_decay)), dim=-1
    )
    state_rows = torch.stack((last_row(decays.update_scores), last_row(decays.momentum_scores)), dim=-1)
    return ChunkGates(retrieval_decays, decays.update_scores, state_decays, state_rows)


def chunk_function_inputs(gate_products, q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve,
                          activation, residual, surprise_bound):
    """What a chunk-loop autograd.Function takes besides the states: options (chunk_size, activation,
    residual, token_retrieval, keep_saved, surprise_bound), q, k, v as (G, T, d), and the gates
    `gate_products` computes (as `stacked_gates` does: same signature and values) with G first.
    Shapes as `memory_scan`."""
    batch, heads, seq_len, dim = q.shape
    gates = gate_products(theta, eta, alpha, chunk_size)
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    # Without a backward to come (inference, decoding), the intermediates are not kept.
    keep_saved = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    options = (chunk_size, activation, residual, retrieve == "token", keep_saved, surprise_bound)
    groups = batch * heads
    return (options, tuple(x.reshape(groups, seq_len, dim) for x in (q, k, v)),
            tuple(x.flatten(0, 1) for x in gates))


def fused_scan(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual,
               surprise_bound):
    """Kernel: trusts its inputs (one dtype, valid shapes, T >= 1). Shapes as `memory_scan`."""
    batch, heads, seq_len, dim = q.shape
    options, sequences, gates = chunk_function_inputs(
        stacked_gates, q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual,
        surprise_bound)
    states = [torch.stack((w, s), dim=3).flatten(0, 1) for w, s in zip(weights, momentum)]  # (G, d_out, 2, d_in)
    y, *states = FusedChunkedScan.apply(options, *sequences, *gates, *states)
    # unbind, not two selects: its backward stacks the two gradients, where each select's would
    # write into a buffer of zeros of the whole state.
    unbound = [state.unbind(2) for state in states]
    weights_out = [w.unflatten(0, (batch, heads)).contiguous() for w, _ in unbound]
    momentum_out = [s.unflatten(0, (batch, heads)).contiguous() for _, s in unbound]
    return y.view(batch, heads, seq_len, dim), weights_out, momentum_out
