"""CausalConv (the memory's features, `kernels.conv_features`) against the textbook causal convolution.

y[b, t, c] = silu(sum_k w[c, k] x_padded[b, t + k, c]), x_padded = [tail | x] along time, each head
L2-normalised when head_dim > 0; fp64, values, new tail and the gradients of x, the tail and the
weight, with and without an incoming tail and for inputs shorter than the tail; bf16 inputs summed
in fp32.
"""

from __future__ import annotations

import pytest
import torch

from titans_train.model.layers import CausalConv

CHANNELS, KERNEL = 6, 4


def explicit_conv(x, tail, weight, head_dim=0):
    padded = torch.cat([tail.transpose(1, 2), x], dim=1)  # (B, K-1+T, C)
    seq_len = x.shape[1]
    z = sum(weight[:, k] * padded[:, k:k + seq_len] for k in range(weight.shape[1]))
    y = z * torch.sigmoid(z)
    if head_dim:
        heads = y.unflatten(-1, (-1, head_dim))
        y = (heads / heads.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)).flatten(2)
    return y, padded[:, seq_len:].transpose(1, 2)


@pytest.mark.parametrize("seq_len, with_tail, head_dim", [(9, True, 0), (9, False, 3), (2, True, 0), (2, True, 2),
                                                          (130, True, 3)])
def test_causal_conv_matches_explicit_sum(seq_len, with_tail, head_dim):
    torch.manual_seed(seq_len)
    conv = CausalConv(CHANNELS, KERNEL, head_dim).double()
    x = torch.randn(2, seq_len, CHANNELS, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, CHANNELS, KERNEL - 1, dtype=torch.float64, requires_grad=True)
    y, new_tail = conv(x, tail if with_tail else None)
    want_y, want_tail = explicit_conv(x, tail if with_tail else torch.zeros_like(tail), conv.weight, head_dim)
    assert y.is_contiguous()
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_tail, want_tail, rtol=0, atol=0)
    upstream = torch.randn_like(y), torch.randn_like(new_tail)
    wrt = [x, conv.weight] + ([tail] if with_tail else [])
    got = torch.autograd.grad((y, new_tail), wrt, upstream)
    want = torch.autograd.grad((want_y, want_tail), wrt, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bf16_input_is_summed_in_fp32_and_keeps_its_dtype():
    """A bf16 input with fp32 weights (as under autocast): bf16 out, within one bf16 rounding of
    the exact sum (a sum accumulated in bf16 rounds at every tap)."""
    torch.manual_seed(0)
    conv = CausalConv(CHANNELS, KERNEL)
    x = torch.randn(2, 9, CHANNELS).bfloat16().requires_grad_()
    y, _ = conv(x, None)
    assert y.dtype == torch.bfloat16
    want, _ = explicit_conv(x.double(), torch.zeros(2, CHANNELS, KERNEL - 1, dtype=torch.float64),
                            conv.weight.double())
    torch.testing.assert_close(y.double(), want, rtol=2 ** -8, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
