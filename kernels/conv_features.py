"""The memory's q, k, v features: silu(causal depthwise conv(x)), optionally L2-normalised per head.

`conv_features(padded, weight, head_dim)` takes time-major data with the conv's tail in front:
padded (B, K-1+T, C), weight (C, K), and returns (B, T, C) in padded's dtype with
  conv[b, t, c] = sum_k weight[c, k] padded[b, t + k, c]   (summed in fp32 at least)
  out = silu(conv), then with head_dim > 0 each head's head_dim contiguous channels divided by
        max(||.||, 1e-12) (F.normalize).
`implementation`: "auto" (the C++ op of kernels/memory_scan/cpu for CPU tensors when the extension
loads, the reference otherwise: CUDA, meta), "cpp" or "reference" (plain PyTorch ops, any device).
The C++ op does each direction in one pass over the rows: MAC runs its memory per 128-token
segment, where the reference's ~15 ATen ops each way cost several times their arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .memory_scan.cpu import extension, extension_loads

IMPLEMENTATIONS = ("auto", "cpp", "reference")


class _DepthwiseCausal(torch.autograd.Function):
    """y[b, t, c] = sum_k weight[c, k] padded[b, t + k, c] on time-major data, as K shifted
    multiply-adds forward and backward.

    The taps are few (K = 4) and the channels contiguous, so these are K passes at memory speed.
    A depthwise conv2d computes the same sums but its CPU backward (oneDNN) cost ~4x the whole
    forward and backward here at T = 128.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """padded (B, K-1+T, C), weight (C, K) -> (B, T, C) in padded's dtype, contiguous; the sums
        in fp32 at least (as a conv accumulates)."""
        compute = torch.promote_types(padded.dtype, torch.float32)
        taps = weight.t().to(compute).contiguous()  # (K, C): each tap a contiguous channel vector
        seq_len = padded.shape[1] - taps.shape[0] + 1
        y = padded[:, :seq_len].to(compute) * taps[0]
        for k in range(1, taps.shape[0]):
            y.addcmul_(padded[:, k:k + seq_len], taps[k])
        ctx.save_for_backward(padded, taps)
        ctx.weight_dtype = weight.dtype
        return y.to(padded.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded, taps = ctx.saved_tensors
        seq_len = grad_y.shape[1]
        grad_y = grad_y.to(taps.dtype)
        grad_padded = torch.zeros_like(padded, dtype=taps.dtype)
        for k in range(taps.shape[0]):
            grad_padded[:, k:k + seq_len].addcmul_(grad_y, taps[k])
        grad_weight = torch.stack([(grad_y * padded[:, k:k + seq_len]).sum((0, 1))
                                   for k in range(taps.shape[0])], dim=1)  # (C, K)
        return grad_padded.to(padded.dtype), grad_weight.to(ctx.weight_dtype)


def reference_conv_features(padded: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The plain-PyTorch form (every device; the contract the C++ op is tested against)."""
    features = F.silu(_DepthwiseCausal.apply(padded, weight))
    if head_dim == 0:
        return features
    heads = features.unflatten(-1, (-1, head_dim))  # (B, T, H, d)
    return F.normalize(heads, dim=-1).flatten(2)


class _CppConvFeatures(torch.autograd.Function):
    """The C++ op (conv_features.cpp); saves only padded and weight, the backward recomputes the conv."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
        ctx.head_dim = head_dim
        ctx.save_for_backward(padded, weight)
        return extension().conv_features_forward(padded, weight, head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        padded, weight = ctx.saved_tensors
        grad_padded, grad_weight = extension().conv_features_backward(grad_out, padded, weight, ctx.head_dim)
        return grad_padded, grad_weight, None


@torch.compiler.disable
def _cpu_conv_features(padded, weight, head_dim, implementation):
    """The C++ op for "cpp", and for "auto" on CPU when the extension loads. Opaque to torch.compile (one
    graph break, the extension check included), as memory_scan's kernels are; eager inside a compiled model."""
    if implementation == "auto" and not extension_loads():
        return reference_conv_features(padded, weight, head_dim)
    return _CppConvFeatures.apply(padded, weight, head_dim)


def conv_features(padded: torch.Tensor, weight: torch.Tensor, head_dim: int = 0,
                  implementation: str = "auto") -> torch.Tensor:
    """silu(causal depthwise conv) of padded (B, K-1+T, C) with weight (C, K) -> (B, T, C), each head of
    head_dim channels L2-normalised when head_dim > 0 (module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if head_dim < 0 or (head_dim and padded.shape[-1] % head_dim):
        raise ValueError(f"head_dim must be 0 (no normalisation) or divide the {padded.shape[-1]} channels, "
                         f"got {head_dim}")
    # No step to compute (padded holds only the tail): the reference's empty output and gradients.
    empty = padded.shape[1] < weight.shape[1]
    if implementation == "reference" or empty or (implementation == "auto" and padded.device.type != "cpu"):
        return reference_conv_features(padded, weight, head_dim)
    return _cpu_conv_features(padded, weight, head_dim, implementation)
