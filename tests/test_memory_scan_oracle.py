"""The oracle itself against the closed form of linear memory (L_M = 1), token by token."""

import torch

from titans_train.kernels import memory_scan_sequential


def test_oracle_matches_linear_closed_form():
    torch.manual_seed(0)
    batch, heads, seq_len, dim = 2, 3, 9, 4
    q, k, v = (torch.randn(batch, heads, seq_len, dim, dtype=torch.float64) for _ in range(3))
    theta, eta, alpha = (torch.rand(batch, heads, seq_len, dtype=torch.float64) for _ in range(3))
    weight = torch.randn(batch, heads, dim, dim, dtype=torch.float64)
    momentum = torch.randn(batch, heads, dim, dim, dtype=torch.float64)
    y, (weights_out, momentum_out) = memory_scan_sequential(
        q, k, v, theta, eta, alpha, (weight,), (momentum,), chunk_size=1, residual=True
    )
    w, s = weight.clone(), momentum.clone()
    expected_y = []
    for t in range(seq_len):
        k_t, v_t = k[:, :, t, :, None], v[:, :, t, :, None]  # (B, H, d, 1)
        grad = (w @ k_t + k_t - v_t) @ k_t.transpose(-1, -2)
        s = eta[:, :, t, None, None] * s - theta[:, :, t, None, None] * grad
        w = (1 - alpha[:, :, t, None, None]) * w + s
        q_t = q[:, :, t, :, None]
        expected_y.append((w @ q_t + q_t).squeeze(-1))
    torch.testing.assert_close(y, torch.stack(expected_y, dim=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights_out[0], w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(momentum_out[0], s, rtol=1e-12, atol=1e-12)
