"""The neural long-term memory of one layer (DESIGN section 3) with its carried state.

State (a dict of tensors, shapes a function of batch size and position only):
  weights.{l}, momentum.{l}   (B, Hm, d_out, d_in)  memory MLP at the start of the open block
  open_keys, open_values      (B, Hm, p, d)         the open block's keys/values (p = position % block)
  open_theta, open_eta, open_alpha  (B, Hm, p)      and its gates
  conv_q, conv_k, conv_v      (B, Hm*d, K-1)        pre-conv tails

A "block" is the unit the memory state is closed at: the chunk for LMM/MAG/MAL, the segment for MAC.
Every update inside a block uses gradients at the block-start weights, so a sequence split inside
a block cannot carry "the weights so far": it carries the block-start weights and momentum plus the
block's tokens, and the next call re-runs the block from its start with the new tokens appended.
This is exact (same chunk boundaries, same math) and costs at most one block of recomputation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from titans_train.kernels import memory_mlp, memory_scan

from .config import TitansConfig
from .exchange import StateExchange
from .layers import CausalConv, split_heads

OPEN_FIELDS = ("open_keys", "open_values", "open_theta", "open_eta", "open_alpha")


class NeuralMemory(nn.Module):
    def __init__(self, config: TitansConfig):
        super().__init__()
        self.n_memory_heads = config.memory_heads
        self.head_dim = config.memory_head_dim
        self.chunk_size = config.chunk_size
        self.retrieve_mode = config.retrieve
        self.activation = config.memory_activation
        self.residual = config.memory_residual
        self.theta_max = config.theta_max
        self.surprise_bound = config.surprise_bound
        self.momentum, self.decay = config.memory_momentum, config.memory_decay
        self.conv_kernel = config.conv_kernel
        inner = self.n_memory_heads * self.head_dim
        self.q_proj = nn.Linear(config.dim, inner, bias=False)
        self.k_proj = nn.Linear(config.dim, inner, bias=False)
        self.v_proj = nn.Linear(config.dim, inner, bias=False)
        # q and k are L2-normalised per head, v is not.
        self.q_conv = CausalConv(inner, config.conv_kernel, self.head_dim)
        self.k_conv = CausalConv(inner, config.conv_kernel, self.head_dim)
        self.v_conv = CausalConv(inner, config.conv_kernel)
        # One scalar gate per head and token: output features are the heads.
        self.theta_proj = nn.Linear(config.dim, self.n_memory_heads, bias=True)
        self.eta_proj = nn.Linear(config.dim, self.n_memory_heads, bias=True)
        self.alpha_proj = nn.Linear(config.dim, self.n_memory_heads, bias=True)
        self.gate_bias_inits = {"theta_proj": config.theta_bias_init,
                                "eta_proj": config.eta_bias_init,
                                "alpha_proj": config.alpha_bias_init}
        widths = [self.head_dim] + [config.memory_expansion * self.head_dim] * (config.memory_depth - 1)
        widths.append(self.head_dim)
        # (d_out, d_in) of each memory MLP layer, per head. State shapes come from here, not from
        # the parameters: a ZeRO-3 partitioned parameter does not have its shape.
        self.layer_shapes = [(d_out, d_in) for d_in, d_out in zip(widths[:-1], widths[1:])]
        # W^0, learned, one set per head (head leading), broadcast over the batch.
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.empty(self.n_memory_heads, *shape)) for shape in self.layer_shapes
        )

    # -- state ---------------------------------------------------------------------------------
    def state_shapes(self, batch_size: int, position: int, block_len: int) -> dict[str, tuple[int, ...]]:
        heads, open_len = self.n_memory_heads, position % block_len
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, shape in enumerate(self.layer_shapes):
            shapes[f"weights.{layer}"] = (batch_size, heads, *shape)
            shapes[f"momentum.{layer}"] = (batch_size, heads, *shape)
        shapes["open_keys"] = shapes["open_values"] = (batch_size, heads, open_len, self.head_dim)
        for gate in ("open_theta", "open_eta", "open_alpha"):
            shapes[gate] = (batch_size, heads, open_len)
        for name in ("conv_q", "conv_k", "conv_v"):
            shapes[name] = (batch_size, heads * self.head_dim, self.conv_kernel - 1)
        return shapes

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state at position 0: weights W^0 (kept differentiable), everything else zero."""
        state = {name: torch.zeros(shape, device=device, dtype=dtype)
                 for name, shape in self.state_shapes(batch_size, 0, 1).items()}
        for layer, weight in enumerate(self.initial_weights):
            state[f"weights.{layer}"] = weight.to(dtype).unsqueeze(0).expand(batch_size, *weight.shape)
        return state

    # -- projections ---------------------------------------------------------------------------
    def query(self, x: torch.Tensor, conv_tail: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries of x (B, T, D): projection, conv, SiLU, l2 norm -> (B, Hm, T, d), new tail."""
        return self._queries(self.q_proj(x), conv_tail)

    def _queries(self, projected: torch.Tensor, conv_tail: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q, tail = self.q_conv(projected, conv_tail)
        return split_heads(q, self.n_memory_heads), tail

    def retrieve(self, weights: tuple[torch.Tensor, ...], q: torch.Tensor) -> torch.Tensor:
        """M_W(q) for q (B, Hm, N, d) with fixed weights (no update)."""
        return memory_mlp(weights, q, self.activation, self.residual)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta, eta, alpha, each (B, Hm, T)."""
        theta = self.theta_max * torch.sigmoid(self.theta_proj(x)).transpose(1, 2)
        eta = torch.sigmoid(self.eta_proj(x)).transpose(1, 2)
        alpha = torch.sigmoid(self.alpha_proj(x)).transpose(1, 2)
        # An ablated term's gate is multiplied by 0 rather than dropped so its projection stays in
        # the graph: every parameter gets a gradient (zero), as DDP and ZeRO expect.
        if not self.momentum:
            eta = eta * 0.0
        if not self.decay:
            alpha = alpha * 0.0
        return theta, eta, alpha

    # -- update and retrieve -------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        state: dict[str, torch.Tensor],
        block_len: int,
        stats: Optional[dict[int, dict[str, torch.Tensor]]] = None,
        exchange: Optional[StateExchange] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Store x (B, T, D) into the memory and retrieve with its queries -> (B, Hm, T, d), state.

        With `exchange` (see `exchange.py`) the conv tails and the memory's incoming weights and
        momentum come from its hooks instead of `state`.
        """
        convs = {"conv_q": self.q_conv, "conv_k": self.k_conv, "conv_v": self.v_conv}
        projected = {"conv_q": self.q_proj(x), "conv_k": self.k_proj(x), "conv_v": self.v_proj(x)}  # (B, T, Hm*d)
        tails = {name: state[name] for name in convs}
        if exchange is not None:
            outgoing = {name: convs[name].outgoing_tail(values) for name, values in projected.items()}
            tails = exchange.exchange_tails(outgoing, tails)
        q, conv_q = self._queries(projected["conv_q"], tails["conv_q"])
        k, conv_k = self.k_conv(projected["conv_k"], tails["conv_k"])
        v, conv_v = self.v_conv(projected["conv_v"], tails["conv_v"])
        k, v = split_heads(k, self.n_memory_heads), split_heads(v, self.n_memory_heads)  # (B, Hm, T, d)
        theta, eta, alpha = self._gates(x)

        open_len = state["open_keys"].shape[2]
        # The open block's tokens are re-run; their queries are irrelevant (outputs discarded).
        q_all = _prepend(q.new_zeros(*q.shape[:2], open_len, q.shape[3]), q) if open_len else q
        k_all = _prepend(state["open_keys"], k)
        v_all = _prepend(state["open_values"], v)
        theta_all = _prepend(state["open_theta"], theta)
        eta_all = _prepend(state["open_eta"], eta)
        alpha_all = _prepend(state["open_alpha"], alpha)
        total = q_all.shape[2]
        closed = total // block_len * block_len

        n_layers = len(self.initial_weights)
        weights = tuple(state[f"weights.{layer}"] for layer in range(n_layers))
        momentum = tuple(state[f"momentum.{layer}"] for layer in range(n_layers))
        if exchange is not None:
            stored = slice(0, closed)  # the whole chunks: what moves the state on
            weights, momentum = exchange.incoming_memory(
                self, k_all[:, :, stored], v_all[:, :, stored], theta_all[:, :, stored],
                eta_all[:, :, stored], alpha_all[:, :, stored], weights, momentum)
        incoming_weights = weights
        outputs = []
        for start, stop in ((0, closed), (closed, total)):
            if stop == start:
                continue
            y, (next_weights, next_momentum) = memory_scan(
                *(_time_slice(x, start, stop) for x in (q_all, k_all, v_all, theta_all, eta_all, alpha_all)),
                weights, momentum, chunk_size=self.chunk_size, retrieve=self.retrieve_mode,
                activation=self.activation, residual=self.residual, surprise_bound=self.surprise_bound,
            )
            outputs.append(y)
            if stop == closed:  # the open tail keeps its block-start weights
                weights, momentum = next_weights, next_momentum
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        y = _time_slice(y, open_len, total)  # the re-run open block's outputs are dropped

        new_state = {f"weights.{layer}": w for layer, w in enumerate(weights)}
        new_state.update({f"momentum.{layer}": s for layer, s in enumerate(momentum)})
        tail = slice(closed, total)
        for name, values in zip(OPEN_FIELDS, (k_all, v_all, theta_all, eta_all, alpha_all)):
            new_state[name] = values[:, :, tail]
        new_state.update(conv_q=conv_q, conv_k=conv_k, conv_v=conv_v)
        if stats is not None:  # keyed by call: a dict survives module hooks that rebuild lists (ZeRO-3)
            stats[len(stats)] = _memory_stats(theta, eta, alpha, incoming_weights, weights, self.retrieve,
                                              k_all[:, :, :closed], v_all[:, :, :closed])
        return y, new_state


def _time_slice(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """x[:, :, start:stop], or x itself when that is all of it: a slice's backward writes its
    gradient into a buffer of zeros of the whole tensor, a cost MAC would pay six times a segment."""
    return x if start == 0 and stop == x.shape[2] else x[:, :, start:stop]


def _prepend(open_part: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Concatenate along time (dim 2); skips the copy when no block is open."""
    return new if open_part.shape[2] == 0 else torch.cat([open_part, new], dim=2)


@torch.no_grad()
def _memory_stats(theta, eta, alpha, weights_before, weights_after, retrieve, keys, values) -> dict[str, torch.Tensor]:
    """The call's gate means, the change of the memory weights and how much the change stored.

    `weights_before`/`weights_after` are the weights entering the call and after its closed
    blocks; `keys`, `values` (B, Hm, N, d) the N pairs those blocks stored (the re-run open block
    included); `retrieve(weights, keys)` the memory MLP.
    """
    squared_change = sum((after - before).pow(2).sum(dim=(-2, -1))
                         for before, after in zip(weights_before, weights_after))  # (B, Hm)
    return {"theta": theta.mean(), "eta": eta.mean(), "alpha": alpha.mean(),
            "update_norm": squared_change.sqrt().mean(),
            **_store_gains(retrieve, weights_before, weights_after, keys, values)}


def _store_gains(retrieve, weights_before, weights_after, keys, values) -> dict[str, torch.Tensor]:
    """store_gain = 1 - l(W_after) / l(W_before), l the associative loss 1/2 ||M_W(k_i) - v_i||^2
    summed over the stored pairs, per sample and head, then averaged (so that the mean over tp
    ranks, which hold equal numbers of heads, is the replica's). store_gain_shuffled: the same
    with each key paired to the value stored N/2 tokens away, the control: drifting towards the
    mean value lowers both losses, storing the pairs lowers the true pairs' more. Both 0 when the
    call closed no block (N = 0: nothing stored). Computed in fp32 at least.
    """
    dtype = torch.promote_types(keys.dtype, torch.float32)  # bf16 losses would round the ratio
    if keys.shape[2] == 0:
        return {"store_gain": keys.new_zeros((), dtype=dtype), "store_gain_shuffled": keys.new_zeros((), dtype=dtype)}
    keys, values = keys.to(dtype), values.to(dtype)
    # Both in one memory layout (W^0 arrives broadcast over the batch), so that unmoved weights
    # give bit-identical predictions: a memory that does not write gains exactly 0.
    before = retrieve(tuple(w.to(dtype).contiguous() for w in weights_before), keys)  # (B, Hm, N, d)
    after = retrieve(tuple(w.to(dtype).contiguous() for w in weights_after), keys)
    gains = {}
    for name, targets in (("store_gain", values), ("store_gain_shuffled", values.roll(keys.shape[2] // 2, dims=2))):
        loss_before = 0.5 * (before - targets).pow(2).sum(dim=(-2, -1))  # (B, Hm)
        loss_after = 0.5 * (after - targets).pow(2).sum(dim=(-2, -1))
        # A memory that already recalls every pair exactly (loss 0 before) gains nothing.
        ratio = torch.where(loss_before > 0, loss_after / loss_before.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        gains[name] = (1 - ratio).mean()
    return gains
