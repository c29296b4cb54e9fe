"""Attention through SDPA against an explicit masked softmax, for every mask the mixers use.

Forward and backward (inputs and parameters) in fp64: causal (the `is_causal` path), causal with
persistent tokens, a sliding window continuing a cached tail (in one call and in query blocks),
and MAC's segment mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from titans_train.model.attention import Attention, window_mask

DIM, HEADS, HEAD_DIM = 16, 2, 8


def explicit_attention(module, queries, keys, values, mask):
    """softmax(q k^T / sqrt(d) masked) v over [persistent | keys], the textbook formula."""
    if module.persistent_keys is not None:
        batch = queries.shape[0]
        keys = torch.cat([module.persistent_keys.expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([module.persistent_values.expand(batch, -1, -1, -1), values], dim=2)
        mask = torch.cat([mask.new_ones(mask.shape[0], module.persistent_keys.shape[1]), mask], dim=1)
    scores = queries @ keys.mT / math.sqrt(queries.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values


def make_module(n_persistent, seed):
    torch.manual_seed(seed)
    module = Attention(DIM, HEADS, HEAD_DIM, n_persistent, rope_base=10000.0).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def assert_same_with_grads(run_fast, run_reference, wrt):
    """Same output, and the same gradients of every tensor in `wrt`, for one upstream."""
    fast = run_fast()
    reference = run_reference()
    assert torch.allclose(fast, reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(reference)
    # An empty cached tail takes no part in the fast path's graph: its gradient is the empty zeros.
    grads_fast = torch.autograd.grad(fast, wrt, upstream, allow_unused=True, materialize_grads=True)
    grads_reference = torch.autograd.grad(reference, wrt, upstream)
    for got, want in zip(grads_fast, grads_reference):
        assert torch.allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "n_persistent, window, cached, query_block",
    [(0, None, 0, 256), (3, None, 0, 256), (0, None, 5, 256), (3, 6, 5, 256), (0, 6, 0, 256),
     (3, 6, 5, 4), (0, 6, 0, 4), (3, 6, 5, 1), (2, 20, 5, 4), (0, 3, 7, 5)],
    ids=["causal-is_causal", "causal-persistent", "causal-cached-tail", "window-persistent-cached", "window",
         "window-blocks-persistent-cached", "window-blocks", "window-blocks-of-one",
         "window-blocks-wider-than-input", "window-blocks-cached-beyond-window"],
)
def test_forward_matches_explicit_attention(n_persistent, window, cached, query_block):
    """With a window, queries attend in blocks of `query_block` (11 tokens: ragged last blocks)."""
    module = make_module(n_persistent, seed=cached + n_persistent)
    module.window_query_block = query_block
    seq_len, position = 11, cached
    x = torch.randn(2, seq_len, DIM, dtype=torch.float64, requires_grad=True)
    tail = {name: torch.randn(2, HEADS, cached, HEAD_DIM, dtype=torch.float64, requires_grad=True)
            for name in ("keys", "values")}

    def reference():
        positions = torch.arange(position, position + seq_len)
        rope = module.rope(positions, x.dtype)
        queries = module.project_queries(x, rope)
        keys, values = module.project_keys_values(x, rope)
        keys = torch.cat([tail["keys"], keys], dim=2)
        values = torch.cat([tail["values"], values], dim=2)
        mask = window_mask(positions, torch.arange(position - cached, position + seq_len), window)
        return explicit_attention(module, queries, keys, values, mask)

    assert_same_with_grads(lambda: module(x, tail, position, window)[0], reference,
                           [x, tail["keys"], tail["values"], *module.parameters()])


def test_mac_segment_mask_matches_explicit_attention():
    """MAC: segment token j sees the retrieved h_i and the tokens x_i for i <= j, after the persistent prefix."""
    module = make_module(4, seed=7)
    offset, length, batch = 3, 5, 2
    queries, memory_keys, keys, memory_values, values = (
        torch.randn(batch, HEADS, n, HEAD_DIM, dtype=torch.float64, requires_grad=True)
        for n in (length, offset + length, offset + length, offset + length, offset + length)
    )
    causal = window_mask(torch.arange(offset, offset + length), torch.arange(offset + length), None)
    mask = torch.cat([causal, causal], dim=1)
    all_keys = lambda: torch.cat([memory_keys, keys], dim=2)  # noqa: E731
    all_values = lambda: torch.cat([memory_values, values], dim=2)  # noqa: E731
    assert_same_with_grads(
        lambda: module.attend(queries, [memory_keys, keys], [memory_values, values], mask),
        lambda: explicit_attention(module, queries, all_keys(), all_values(), mask),
        [queries, memory_keys, keys, memory_values, values, module.persistent_keys, module.persistent_values],
    )
