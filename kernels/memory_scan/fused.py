"""The chunk loop as one autograd.Function with a hand-written backward (math: README.md here).

Same closed form as `chunked.py`, arranged for speed: each layer's weights and momentum are kept
stacked as one (G, 2, d_out, d_in) state, so h W^T and h S^T are one product and the update of
both is one product; the forward saves every intermediate the backward needs (no recomputation);
the backward walks the chunks in reverse, carrying the gradient of the state. First-order only:
the backward is not itself differentiable (`chunked.chunked_scan` is, through autograd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .activations import activation_second_derivative, activation_with_derivative
from .decays import chunk_decays


class ChunkGates(NamedTuple):
    """One chunk's gate products, G = B * H groups, n tokens (see `chunked.ChunkDecays`)."""

    retrieval_decays: torch.Tensor  # (G, n, 2): [A_t, E_t], weights of W^c and S^c in W_t
    update_scores: torch.Tensor  # (G, n, n): C[t, i] theta_i
    state_decays: torch.Tensor  # (G, 3): [A_n, E_n, P_n]
    state_rows: torch.Tensor  # (G, 2, n): [C[n, i] theta_i, D_eta[n, i] theta_i]


class SavedChunk(NamedTuple):
    """What the backward of one chunk reads, per layer l (lists) unless noted."""

    states: list  # (G, 2, d_out, d_in): the chunk-start weights and momentum
    layer_inputs: list  # (G, n, d_in): a_{l-1} of the store pass, a_0 = k
    pre_activations: list  # (G, n, width): z_l of the hidden layers
    derivatives: list  # act'(z_l)
    carried: list  # (G, n, width): delta_{l+1} W_{l+1}, so delta_l = carried * act'(z_l)
    errors: list  # (G, n, d_out): delta_l
    retrieval_inputs: list  # (G, n, d_in): h_{l-1} of the retrieval pass, h_0 = q
    projections: list  # (G, n, 2 * d_out): [h W^T | h S^T] (token retrieval)
    grams: list  # (G, n, n): h a^T (token retrieval)
    retrieval_derivatives: list  # act'(r_l) of the hidden retrieval layers


def _forward_chunk(states, q, k, v, gates: ChunkGates, activation, residual, token_retrieval):
    """states: L tensors (G, 2, d_out, d_in); q, k, v: (G, n, d). Returns y, next states, saved."""
    depth = len(states)
    layer_inputs, pre_activations, derivatives = [k], [], []
    hidden = k
    for layer, state in enumerate(states):
        hidden = hidden @ state[:, 0].mT
        if layer < depth - 1:
            pre_activations.append(hidden)
            hidden, derivative = activation_with_derivative(hidden, activation)
            derivatives.append(derivative)
            layer_inputs.append(hidden)
    error = (hidden + k if residual else hidden) - v
    errors, carried = [error], []
    for layer in range(depth - 2, -1, -1):
        carry = error @ states[layer + 1][:, 0]
        error = carry * derivatives[layer]
        carried.append(carry)
        errors.append(error)
    errors.reverse()
    carried.reverse()

    retrieval_inputs, projections, grams, retrieval_derivatives = [], [], [], []
    hidden = q
    for layer, state in enumerate(states):
        retrieval_inputs.append(hidden)
        groups, _, d_out, d_in = state.shape
        if token_retrieval:
            projection = hidden @ state.view(groups, 2 * d_out, d_in).mT  # (G, n, 2 d_out)
            gram = hidden @ layer_inputs[layer].mT  # (G, n, n)
            mixed = (projection.unflatten(-1, (2, d_out)) * gates.retrieval_decays.unsqueeze(-1)).sum(-2)
            hidden = torch.baddbmm(mixed, gates.update_scores * gram, errors[layer], alpha=-1)
            projections.append(projection)
            grams.append(gram)
        else:
            hidden = hidden @ state[:, 0].mT
        if layer < depth - 1:
            hidden, derivative = activation_with_derivative(hidden, activation)
            retrieval_derivatives.append(derivative)
    y = hidden + q if residual else hidden

    next_states = []
    decay_weight, carry_momentum, decay_momentum = (
        gates.state_decays[:, i, None, None] for i in range(3)
    )  # (G, 1, 1)
    for layer, state in enumerate(states):
        groups, _, d_out, d_in = state.shape
        scaled_inputs = gates.state_rows.unsqueeze(-1) * layer_inputs[layer].unsqueeze(1)  # (G, 2, n, d_in)
        update = errors[layer].mT.unsqueeze(1) @ scaled_inputs  # (G, 2, d_out, d_in)
        weight, momentum = state.unbind(1)
        next_state = torch.stack(
            (decay_weight * weight + carry_momentum * momentum, decay_momentum * momentum), dim=1
        )
        next_states.append(next_state - update)
    saved = SavedChunk(
        list(states), layer_inputs, pre_activations, derivatives, carried, errors,
        retrieval_inputs, projections, grams, retrieval_derivatives,
    )
    return y, next_states, saved


def _backward_chunk(saved: SavedChunk, grad_y, grad_next, gates: ChunkGates, activation, residual, token_retrieval):
    """Gradients of one chunk's inputs from those of its outputs (y and the next states)."""
    states = saved.states
    depth = len(states)
    grad_states, grad_errors, grad_inputs = [], [], []
    grad_state_decays = grad_y.new_zeros(grad_y.shape[0], 2, 2)
    grad_state_rows = torch.zeros_like(gates.state_rows)
    # The state update: next = [[A_n, E_n], [0, P_n]] [W; S] - delta^T [C_n theta * a; D_eta,n theta * a].
    for layer, (state, grad) in enumerate(zip(states, grad_next)):
        groups, _, d_out, d_in = state.shape
        decay_weight, carry_momentum, decay_momentum = (gates.state_decays[:, i, None, None] for i in range(3))
        grad_weight, grad_momentum = grad.unbind(1)
        grad_states.append(
            torch.stack((decay_weight * grad_weight, carry_momentum * grad_weight + decay_momentum * grad_momentum), 1)
        )
        # [<gW', W>, <gW', S>], [<gS', W>, <gS', S>]
        grad_state_decays += grad.flatten(2) @ state.flatten(2).mT
        layer_input = saved.layer_inputs[layer]
        input_grads = (layer_input @ grad.view(groups, 2 * d_out, d_in).mT).unflatten(-1, (2, d_out))
        grad_errors.append(-(input_grads * gates.state_rows.mT.unsqueeze(-1)).sum(-2))  # (G, n, d_out)
        error_grads = saved.errors[layer].unsqueeze(1) @ grad  # (G, 2, n, d_in)
        grad_inputs.append(-(error_grads * gates.state_rows.unsqueeze(-1)).sum(1))
        grad_state_rows -= (error_grads * layer_input.unsqueeze(1)).sum(-1)

    grad_retrieval_decays = torch.zeros_like(gates.retrieval_decays)
    grad_update_scores = torch.zeros_like(gates.update_scores)
    grad_hidden = grad_y
    for layer in range(depth - 1, -1, -1):
        state = states[layer]
        groups, _, d_out, d_in = state.shape
        grad_out = grad_hidden if layer == depth - 1 else grad_hidden * saved.retrieval_derivatives[layer]
        hidden = saved.retrieval_inputs[layer]
        if token_retrieval:
            projection = saved.projections[layer].unflatten(-1, (2, d_out))
            grad_retrieval_decays += (projection * grad_out.unsqueeze(-2)).sum(-1)
            grad_projection = (gates.retrieval_decays.unsqueeze(-1) * grad_out.unsqueeze(-2)).flatten(-2)
            grad_states[layer] += (grad_projection.mT @ hidden).view(groups, 2, d_out, d_in)
            grad_hidden = grad_projection @ state.view(groups, 2 * d_out, d_in)
            gram = saved.grams[layer]
            grad_scores = grad_out @ saved.errors[layer].mT  # minus the gradient of the scores
            grad_errors[layer] -= (gates.update_scores * gram).mT @ grad_out
            grad_update_scores -= grad_scores * gram
            grad_gram = grad_scores * gates.update_scores
            grad_hidden -= grad_gram @ saved.layer_inputs[layer]
            grad_inputs[layer] -= grad_gram.mT @ hidden
        else:
            grad_states[layer][:, 0] += grad_out.mT @ hidden
            grad_hidden = grad_out @ state[:, 0]
    grad_q = grad_hidden + grad_y if residual else grad_hidden

    # The errors: delta_l = (delta_{l+1} W_{l+1}) * act'(z_l).
    grad_pre_activations = []
    for layer in range(depth - 1):
        grad_error = grad_errors[layer]
        grad_carry = grad_error * saved.derivatives[layer]
        grad_pre_activations.append(
            grad_error * saved.carried[layer]
            * activation_second_derivative(saved.pre_activations[layer], activation)
        )
        next_weight = states[layer + 1][:, 0]
        grad_errors[layer + 1] += grad_carry @ next_weight.mT
        grad_states[layer + 1][:, 0] += saved.errors[layer + 1].mT @ grad_carry

    # The store pass: out = M_W(k), delta_L = out - v.
    grad_out = grad_errors[-1]
    grad_v = -grad_out
    grad_k = grad_out.clone() if residual else torch.zeros_like(grad_out)
    grad_pre = grad_out
    for layer in range(depth - 1, -1, -1):
        weight = states[layer][:, 0]
        grad_states[layer][:, 0] += grad_pre.mT @ saved.layer_inputs[layer]
        grad_input = grad_inputs[layer] + grad_pre @ weight
        if layer > 0:
            grad_pre = grad_input * saved.derivatives[layer - 1] + grad_pre_activations[layer - 1]
        else:
            grad_k += grad_input
    grad_state_decays = torch.stack(
        (grad_state_decays[:, 0, 0], grad_state_decays[:, 0, 1], grad_state_decays[:, 1, 1]), dim=-1
    )
    grad_gates = ChunkGates(grad_retrieval_decays, grad_update_scores, grad_state_decays, grad_state_rows)
    return grad_q, grad_k, grad_v, grad_gates, grad_states


def _chunk_gates(gates: ChunkGates, index: int, length: int) -> ChunkGates:
    retrieval_decays, update_scores, state_decays, state_rows = gates
    return ChunkGates(
        retrieval_decays[:, index, :length],
        update_scores[:, index, :length, :length],
        state_decays[:, index],
        state_rows[:, index, :, :length],
    )


class FusedChunkedScan(torch.autograd.Function):
    """q, k, v (G, T, d); gates `ChunkGates` with a chunk dim after G; states L x (G, 2, d_out, d_in)."""

    @staticmethod
    def forward(ctx, options, q, k, v, retrieval_decays, update_scores, state_decays, state_rows, *states):
        chunk_size, activation, residual, token_retrieval = options
        gates = ChunkGates(retrieval_decays, update_scores, state_decays, state_rows)
        seq_len = q.shape[1]
        outputs, saved_chunks = [], []
        for index, start in enumerate(range(0, seq_len, chunk_size)):
            tokens = slice(start, min(start + chunk_size, seq_len))
            y, states, saved = _forward_chunk(
                states, q[:, tokens], k[:, tokens], v[:, tokens],
                _chunk_gates(gates, index, tokens.stop - start), activation, residual, token_retrieval,
            )
            outputs.append(y)
            saved_chunks.append(saved)
        ctx.options = options
        ctx.saved_chunks = saved_chunks
        ctx.save_for_backward(retrieval_decays, update_scores, state_decays, state_rows)
        return (torch.cat(outputs, dim=1), *states)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_states):
        chunk_size, activation, residual, token_retrieval = ctx.options
        gates = ChunkGates(*ctx.saved_tensors)
        saved_chunks = ctx.saved_chunks
        grad_q, grad_k, grad_v = (torch.empty_like(grad_y) for _ in range(3))
        grad_gates = ChunkGates(*(torch.zeros_like(x) for x in gates))
        seq_len = grad_y.shape[1]
        grad_states = list(grad_states)
        for index in range(len(saved_chunks) - 1, -1, -1):
            start = index * chunk_size
            tokens = slice(start, min(start + chunk_size, seq_len))
            length = tokens.stop - start
            chunk_q, chunk_k, chunk_v, chunk_gates, grad_states = _backward_chunk(
                saved_chunks[index], grad_y[:, tokens], grad_states,
                _chunk_gates(gates, index, length), activation, residual, token_retrieval,
            )
            grad_q[:, tokens], grad_k[:, tokens], grad_v[:, tokens] = chunk_q, chunk_k, chunk_v
            grad_gates.retrieval_decays[:, index, :length] = chunk_gates.retrieval_decays
            grad_gates.update_scores[:, index, :length, :length] = chunk_gates.update_scores
            grad_gates.state_decays[:, index] = chunk_gates.state_decays
            grad_gates.state_rows[:, index, :, :length] = chunk_gates.state_rows
        del ctx.saved_chunks
        return (None, grad_q, grad_k, grad_v, *grad_gates, *grad_states)


def fused_scan(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, residual):
    """Kernel: trusts its inputs (one dtype, valid shapes, T >= 1). Shapes as `memory_scan`."""
    batch, heads, seq_len, dim = q.shape
    decays = chunk_decays(theta, eta, alpha, chunk_size)
    n_chunks = decays.weight_decay.shape[2]
    # The state update reads each chunk's last row; the last chunk may be short.
    last = torch.full((n_chunks,), chunk_size - 1, device=q.device)
    last[-1] = (seq_len - 1) % chunk_size
    chunks = torch.arange(n_chunks, device=q.device)

    def last_row(x):  # (B, H, nc, n, ...) -> (B, H, nc, ...)
        return x[:, :, chunks, last]

    retrieval_decays = torch.stack((decays.weight_decay, decays.momentum_carry), dim=-1)
    state_decays = torch.stack(
        (last_row(decays.weight_decay), last_row(decays.momentum_carry), last_row(decays.momentum_decay)), dim=-1
    )
    state_rows = torch.stack((last_row(decays.update_scores), last_row(decays.momentum_scores)), dim=-2)
    gates = (retrieval_decays, decays.update_scores, state_decays, state_rows)
    groups = batch * heads
    states = [torch.stack((w, s), dim=2).flatten(0, 1) for w, s in zip(weights, momentum)]  # (G, 2, d_out, d_in)
    options = (chunk_size, activation, residual, retrieve == "token")
    y, *states = FusedChunkedScan.apply(
        options, *(x.reshape(groups, seq_len, dim) for x in (q, k, v)), *(x.flatten(0, 1) for x in gates), *states
    )
    weights_out = [s[:, 0].unflatten(0, (batch, heads)) for s in states]
    momentum_out = [s[:, 1].unflatten(0, (batch, heads)) for s in states]
    return y.view(batch, heads, seq_len, dim), weights_out, momentum_out
