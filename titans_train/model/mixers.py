"""The token mixers of DESIGN section 4: lmm, mac, mag, mal, and the transformer/swa baselines.

Every mixer maps the normed input x (B, T, D) and its layer state to an output (B, T, D) and the
new state, and ends with a per-head norm, a learned output gate silu(W_g x) and an output
projection (`GatedOutput`). State keys are prefixed by the submodule owning them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, window_mask
from .config import TitansConfig
from .exchange import StateExchange
from .layers import HeadRMSNorm, merge_heads, split_heads
from .memory import NeuralMemory

State = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}.{name}": value for name, value in values.items()}


def _sub(state: State, prefix: str) -> State:
    start = len(prefix) + 1
    return {name[start:]: value for name, value in state.items() if name.startswith(prefix + ".")}


def _zeros(shapes: Shapes, device, dtype) -> State:
    return {name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in shapes.items()}


class GatedOutput(nn.Module):
    """o -> out_proj(norm_per_head(o) [* modulation] * silu(gate_proj(x)))."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm = HeadRMSNorm(n_heads, head_dim, eps)
        self.gate_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.out_proj.is_residual_projection = True

    def forward(self, heads: torch.Tensor, x: torch.Tensor,
                modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """heads (B, H, T, d), x (B, T, D), modulation (B, T, H*d) -> (B, T, D)."""
        core = self.norm(heads.transpose(1, 2)).flatten(2)  # (B, T, H*d)
        if modulation is not None:
            core = core * modulation
        return self.out_proj(core * F.silu(self.gate_proj(x)))


def _attention(config: TitansConfig) -> Attention:
    return Attention(config.dim, config.n_heads, config.head_dim, config.persistent_tokens,
                     config.rope_base)


class AttentionMixer(nn.Module):
    """`transformer` (full causal) and `swa` (sliding window) baselines: attention alone."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.window = config.attention_window
        self.attention = _attention(config)
        self.output = GatedOutput(config.dim, config.n_heads, config.head_dim, config.norm_eps)

    def state_shapes(self, batch_size: int, position: int) -> Shapes:
        return _prefixed("attention", self.attention.cached_state_shapes(batch_size, position, self.window))

    def initial_state(self, batch_size: int, device, dtype) -> State:
        return _zeros(self.state_shapes(batch_size, 0), device, dtype)

    def forward(self, x, state: State, position: int, stats=None, exchange: Optional[StateExchange] = None):
        attended, attention_state = self.attention(x, _sub(state, "attention"), position, self.window,
                                                   exchange)
        return self.output(attended, x), _prefixed("attention", attention_state)


class LMMMixer(nn.Module):
    """`lmm`: the neural memory alone."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.block_len = config.chunk_size
        self.memory = NeuralMemory(config)
        self.output = GatedOutput(config.dim, config.memory_heads, config.memory_head_dim, config.norm_eps)

    def state_shapes(self, batch_size: int, position: int) -> Shapes:
        return _prefixed("memory", self.memory.state_shapes(batch_size, position, self.block_len))

    def initial_state(self, batch_size: int, device, dtype) -> State:
        return _prefixed("memory", self.memory.initial_state(batch_size, device, dtype))

    def forward(self, x, state: State, position: int, stats=None, exchange: Optional[StateExchange] = None):
        retrieved, memory_state = self.memory(x, _sub(state, "memory"), self.block_len, stats, exchange)
        return self.output(retrieved, x), _prefixed("memory", memory_state)


class _WindowAndMemoryState:
    """State of a mixer with a sliding-window `attention` and a chunk-blocked `memory` (mag, mal)."""

    def state_shapes(self, batch_size: int, position: int) -> Shapes:
        shapes = _prefixed("attention", self.attention.cached_state_shapes(batch_size, position, self.window))
        shapes.update(_prefixed("memory", self.memory.state_shapes(batch_size, position, self.block_len)))
        return shapes

    def initial_state(self, batch_size: int, device, dtype) -> State:
        state = _zeros(_prefixed("attention", self.attention.cached_state_shapes(batch_size, 0, self.window)),
                       device, dtype)
        state.update(_prefixed("memory", self.memory.initial_state(batch_size, device, dtype)))
        return state


class MAGMixer(_WindowAndMemoryState, nn.Module):
    """`mag`: sliding-window attention (persistent prefix) beside the memory on the same input.

    o = norm(y) * act(norm(m)) per channel, then the gate and projection. Attention heads and
    memory heads both tile the D channels contiguously, so the product pairs channels head-locally.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.window = config.attention_window
        self.block_len = config.chunk_size
        self.gate_activation = config.mag_gate_activation
        self.attention = _attention(config)
        self.memory = NeuralMemory(config)
        self.memory_norm = HeadRMSNorm(config.memory_heads, config.memory_head_dim, config.norm_eps)
        self.output = GatedOutput(config.dim, config.n_heads, config.head_dim, config.norm_eps)

    def forward(self, x, state: State, position: int, stats=None, exchange: Optional[StateExchange] = None):
        attended, attention_state = self.attention(x, _sub(state, "attention"), position, self.window,
                                                   exchange)
        retrieved, memory_state = self.memory(x, _sub(state, "memory"), self.block_len, stats, exchange)
        normed_memory = self.memory_norm(retrieved.transpose(1, 2)).flatten(2)  # (B, T, D)
        if self.gate_activation == "sigmoid":
            modulation = torch.sigmoid(normed_memory)
        else:
            modulation = F.silu(normed_memory)
        out = self.output(attended, x, modulation)
        new_state = _prefixed("attention", attention_state)
        new_state.update(_prefixed("memory", memory_state))
        return out, new_state


class MALMixer(_WindowAndMemoryState, nn.Module):
    """`mal`: the memory as a layer, then sliding-window attention (persistent prefix) on its output."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.window = config.attention_window
        self.block_len = config.chunk_size
        self.memory = NeuralMemory(config)
        self.memory_norm = HeadRMSNorm(config.memory_heads, config.memory_head_dim, config.norm_eps)
        self.memory_out_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.attention = _attention(config)
        self.output = GatedOutput(config.dim, config.n_heads, config.head_dim, config.norm_eps)

    def forward(self, x, state: State, position: int, stats=None, exchange: Optional[StateExchange] = None):
        retrieved, memory_state = self.memory(x, _sub(state, "memory"), self.block_len, stats, exchange)
        memory_out = self.memory_out_proj(self.memory_norm(retrieved.transpose(1, 2)).flatten(2))  # (B, T, D)
        attended, attention_state = self.attention(memory_out, _sub(state, "attention"), position, self.window,
                                                   exchange)
        new_state = _prefixed("attention", attention_state)
        new_state.update(_prefixed("memory", memory_state))
        return self.output(attended, x), new_state


MAC_CACHE = ("memory_keys", "memory_values", "keys", "values")


class MACMixer(nn.Module):
    """`mac`, paper eqs. 21-25, per segment of `segment_len` tokens:

    1. retrieve h = M_prev(q(x)) with the memory as it was before the segment;
    2. attend: segment token j over [persistent | h_0..h_j | x_0..x_j] of its segment;
    3. update the memory with y = the attention output, normed per memory head (k, v, gates from
       y), retrieving M_t(q(y));
    4. o = y * M_updated(y), then norm, gate, projection.

    The memory's block is the segment, so its state holds the segment-start weights (needed by
    step 1 for every token of the segment) plus the open segment's keys/values; the attention
    state holds the open segment's keys/values of h and x.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.segment_len = config.segment_len
        self.memory = NeuralMemory(config)
        self.attention = _attention(config)
        self.attention_out_proj = nn.Linear(config.dim, config.dim, bias=False)
        # y feeds the memory's projections and gates; unnormalised, its growth during training
        # saturates the gates and blows up the inner loop (the other mixers feed the normed x).
        self.y_norm = HeadRMSNorm(config.memory_heads, config.memory_head_dim, config.norm_eps)
        self.output = GatedOutput(config.dim, config.memory_heads, config.memory_head_dim, config.norm_eps)

    def state_shapes(self, batch_size: int, position: int) -> Shapes:
        open_len = position % self.segment_len
        cache = (batch_size, self.attention.n_heads, open_len, self.attention.head_dim)
        shapes = {f"attention.{name}": cache for name in MAC_CACHE}
        memory = self.memory.state_shapes(batch_size, position, self.segment_len)
        shapes.update(_prefixed("memory", memory))
        shapes["retrieve_conv_q"] = memory["conv_q"]
        return shapes

    def initial_state(self, batch_size: int, device, dtype) -> State:
        state = _zeros(self.state_shapes(batch_size, 0), device, dtype)
        state.update(_prefixed("memory", self.memory.initial_state(batch_size, device, dtype)))
        return state

    def forward(self, x, state: State, position: int, stats=None, exchange: Optional[StateExchange] = None):
        if exchange is not None:
            # The memory stores y, which depends on the retrieval from the incoming memory state:
            # its keys exist only once that state is known, so no hook can supply it early.
            raise ValueError("mac cannot take its incoming state from a StateExchange (its memory "
                             "input depends on the incoming memory); run it with the whole state")
        seq_len = x.shape[1]
        positions = torch.arange(position, position + seq_len, device=x.device)
        # The call's pieces: the rest of the open segment, whole segments, an open tail.
        offsets, lengths = [], []
        start = 0
        while start < seq_len:
            offsets.append((position + start) % self.segment_len)  # tokens of this segment seen before
            lengths.append(min(seq_len - start, self.segment_len - offsets[-1]))
            start += lengths[-1]
        # Everything computed from x alone is done for the whole call at once, then split into the
        # pieces (one split: its backward joins the pieces' gradients in one copy, where slices
        # would each add into a whole-call buffer of zeros).
        rope = self.attention.rope(positions, x.dtype)
        retrieve_queries, retrieve_conv = self.memory.query(x, state["retrieve_conv_q"])  # (B, Hm, T, d)
        keys_x, values_x = self.attention.project_keys_values(x, rope)  # (B, H, T, d)
        queries = self.attention.project_queries(x, rope)  # (B, H, T, d)
        from_x = zip(*(tensor.split(lengths, dim=2) for tensor in (retrieve_queries, queries, keys_x, values_x)),
                     zip(rope[0].split(lengths), rope[1].split(lengths)))
        masks = {}  # (offset, length) -> mask: whole segments share one
        memory_state = _sub(state, "memory")
        cache = {name: state[f"attention.{name}"] for name in MAC_CACHE}
        outputs = []
        for offset, length, (retrieve_query, queries, keys, values, piece_rope) in zip(offsets, lengths, from_x):
            segment_start_weights = tuple(memory_state[f"weights.{layer}"]
                                          for layer in range(len(self.memory.initial_weights)))
            retrieved = self.memory.retrieve(segment_start_weights, retrieve_query)
            keys_h, values_h = self.attention.project_keys_values(merge_heads(retrieved), piece_rope)
            if (offset, length) not in masks:
                # Token j of the segment sees h_i and x_i for i <= j (segment-relative indices).
                causal = window_mask(torch.arange(offset, offset + length, device=x.device),
                                     torch.arange(offset + length, device=x.device), None)
                masks[offset, length] = torch.cat([causal, causal], dim=1)
            attended = self.attention.attend(
                queries,
                [cache["memory_keys"], keys_h, cache["keys"], keys],
                [cache["memory_values"], values_h, cache["values"], values],
                masks[offset, length],
            )  # (B, H, length, d)
            segment_parts = {"memory_keys": keys_h, "memory_values": values_h, "keys": keys, "values": values}
            if offset + length == self.segment_len:
                # The segment is closed: its cache is dropped. Empty views of this segment's keys,
                # not of the incoming cache (which requires grad only on a rank that received it):
                # every sequence-parallel rank then has the same backward graph, which ZeRO-3
                # checks (it gathers parameters module by module in one order on all ranks).
                cache = {name: part[:, :, :0] for name, part in segment_parts.items()}
            else:
                cache = {name: torch.cat([cache[name], part], dim=2) for name, part in segment_parts.items()}
            projected = self.attention_out_proj(merge_heads(attended))  # (B, length, D)
            y = self.y_norm(projected.unflatten(-1, (-1, self.memory.head_dim))).flatten(2)
            updated, memory_state = self.memory(y, memory_state, self.segment_len, stats)
            # y's channels pair with the memory heads' channels (under tensor parallelism the
            # attention output projection hands each rank the channels of its own heads).
            outputs.append(split_heads(y, self.memory.n_memory_heads) * updated)  # (B, Hm, length, d)
        out = self.output(torch.cat(outputs, dim=2), x)
        new_state = {f"attention.{name}": value for name, value in cache.items()}
        new_state.update(_prefixed("memory", memory_state))
        new_state["retrieve_conv_q"] = retrieve_conv
        return out, new_state


MIXERS = {
    "lmm": LMMMixer,
    "mac": MACMixer,
    "mag": MAGMixer,
    "mal": MALMixer,
    "transformer": AttentionMixer,
    "swa": AttentionMixer,
}


def build_mixer(config: TitansConfig) -> nn.Module:
    return MIXERS[config.variant](config)
