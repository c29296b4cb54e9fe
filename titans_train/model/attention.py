"""Multi-head attention with RoPE, learned persistent keys/values and a carried key/value tail.

Persistent memory is a per-head set of learned keys and values (H, N_p, d), prepended to every
query's keys without RoPE (position-free, always visible). This is the paper's "persistent tokens
prepended to the sequence" with the token's key/value projections folded into free parameters.
Keys are cached after RoPE at absolute positions, so a continued sequence attends exactly as a
whole one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .exchange import StateExchange
from .layers import rope_tables, rotate, split_heads

# Sliding-window queries attend in blocks of this many, each over only the keys its window reaches:
# SDPA computes every score of its mask, visible or not, so one (T, T) mask costs T^2 scores
# where the window needs ~T * window. 256 was the fastest block for windows of 256 to 1024 on
# CPU (docs/BENCHMARKS.md, "Sliding-window attention in query blocks"). The price, with persistent
# tokens: each block's keys and values are a copy (persistent ones first), saved for backward,
# ~(window + 256) / 256 times the call's keys and values (docs/scaling.md: +0.1-0.8 GiB per GPU
# in the mag recipes' plans).
WINDOW_QUERY_BLOCK = 256


def window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Bool (Tq, Tk): a query sees keys at or before it, and with a window only the last `window`."""
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    return visible


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, n_persistent: int, rope_base: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.rope_base = rope_base
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        if n_persistent > 0:
            self.persistent_keys = nn.Parameter(torch.empty(n_heads, n_persistent, head_dim))
            self.persistent_values = nn.Parameter(torch.empty(n_heads, n_persistent, head_dim))
        else:
            self.persistent_keys = self.persistent_values = None
        self.window_query_block = WINDOW_QUERY_BLOCK

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (cos, sin), each (T, d), of absolute positions (T,)."""
        return rope_tables(positions, self.head_dim, self.rope_base, dtype)

    def project_queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) and the `rope` tables of its positions -> rotated queries (B, H, T, d)."""
        return rotate(split_heads(self.q_proj(x), self.n_heads), rope)

    def project_keys_values(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) and the `rope` tables of its positions -> rotated keys, values, each (B, H, T, d)."""
        keys = rotate(split_heads(self.k_proj(x), self.n_heads), rope)
        return keys, split_heads(self.v_proj(x), self.n_heads)

    def attend(self, queries: torch.Tensor, key_parts: Sequence[torch.Tensor], value_parts: Sequence[torch.Tensor],
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Queries (B, H, Tq, d) over [persistent | key parts joined along time (B, H, Tk, d)] with
        mask (Tq, Tk) -> (B, H, Tq, d).

        The parts (e.g. a cached tail and the new keys) are joined together with the persistent
        tokens in one copy. mask None means plain causal attention of Tq = Tk tokens; without
        persistent tokens it goes to SDPA as `is_causal`, which is what lets CUDA pick its flash
        kernel (a boolean mask restricts SDPA to the memory-efficient and math kernels).
        """
        if mask is None:
            if self.persistent_keys is None:
                return F.scaled_dot_product_attention(queries, _joined(key_parts), _joined(value_parts),
                                                      is_causal=True)
            positions = torch.arange(queries.shape[2], device=queries.device)
            mask = window_mask(positions, positions, None)
        if self.persistent_keys is not None:
            batch = queries.shape[0]
            n_persistent = self.persistent_keys.shape[1]
            dtype = key_parts[0].dtype
            key_parts = [self.persistent_keys.to(dtype).expand(batch, -1, -1, -1), *key_parts]
            value_parts = [self.persistent_values.to(dtype).expand(batch, -1, -1, -1), *value_parts]
            mask = torch.cat([mask.new_ones(mask.shape[0], n_persistent), mask], dim=1)
        return F.scaled_dot_product_attention(queries, _joined(key_parts), _joined(value_parts), attn_mask=mask)

    def _attend_window_blocks(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              positions: torch.Tensor, key_positions: torch.Tensor, cached: int, window: int
                              ) -> torch.Tensor:
        """Sliding-window attention of queries (B, H, T, d) at `positions` over keys/values (B, H,
        cached + T, d) at `key_positions` (the first `cached` before the queries), in blocks of
        `window_query_block` queries: a block's keys run from its first query's window start to its
        last query. -> (B, H, T, d), equal to one call with the whole mask."""
        seq_len = queries.shape[2]
        outputs = []
        for start in range(0, seq_len, self.window_query_block):
            stop = min(start + self.window_query_block, seq_len)
            low, high = max(0, cached + start - window + 1), cached + stop
            mask = window_mask(positions[start:stop], key_positions[low:high], window)
            outputs.append(self.attend(queries[:, :, start:stop], [keys[:, :, low:high]], [values[:, :, low:high]],
                                       mask))
        return torch.cat(outputs, dim=2)

    def cached_state_shapes(self, batch_size: int, position: int, window: Optional[int]) -> dict[str, tuple[int, ...]]:
        cached = position if window is None else min(position, window - 1)
        shape = (batch_size, self.n_heads, cached, self.head_dim)
        return {"keys": shape, "values": shape}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], position: int,
                window: Optional[int], exchange: Optional[StateExchange] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Causal (window None) or sliding-window attention of x (B, T, D) continuing `state`.

        Returns per-head outputs (B, H, T, d) and the new key/value tail (last window-1 tokens,
        or all of them for full attention). With `exchange` (sliding window only, T >= window-1)
        the incoming tail comes from `exchange.exchange_tails`.
        """
        seq_len = x.shape[1]
        positions = torch.arange(position, position + seq_len, device=x.device)
        rope = self.rope(positions, x.dtype)
        queries = self.project_queries(x, rope)
        new_keys, new_values = self.project_keys_values(x, rope)
        tail = {"keys": state["keys"], "values": state["values"]}
        if exchange is not None:
            if window is None or seq_len < window - 1:
                raise ValueError(f"an exchanged key/value tail needs a sliding window no longer than "
                                 f"the input + 1 (window {window}, {seq_len} tokens): otherwise the "
                                 "outgoing tail includes the incoming one")
            start = seq_len - (window - 1)
            tail = exchange.exchange_tails({"keys": new_keys[:, :, start:], "values": new_values[:, :, start:]},
                                           tail)
        cached = tail["keys"].shape[2]
        key_positions = torch.arange(position - cached, position + seq_len, device=x.device)
        if window is not None and seq_len > self.window_query_block:
            out = self._attend_window_blocks(queries, _joined([tail["keys"], new_keys]),
                                             _joined([tail["values"], new_values]), positions, key_positions,
                                             cached, window)
        else:
            plain_causal = window is None and cached == 0
            mask = None if plain_causal else window_mask(positions, key_positions, window)
            out = self.attend(queries, [tail["keys"], new_keys], [tail["values"], new_values], mask)
        keep = cached + seq_len if window is None else min(cached + seq_len, window - 1)
        return out, {name: _last(tail[name], new, keep)
                     for name, new in (("keys", new_keys), ("values", new_values))}


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts concatenated along time (dim 2), empty ones skipped: no copy for a single part."""
    parts = [part for part in parts if part.shape[2] > 0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _last(tail: torch.Tensor, new: torch.Tensor, keep: int) -> torch.Tensor:
    """The last `keep` steps of [tail | new] along time, a view of `new` when they all lie in it."""
    if keep <= new.shape[2]:
        return new[:, :, new.shape[2] - keep:]
    return _joined([tail[:, :, tail.shape[2] - (keep - new.shape[2]):], new])
