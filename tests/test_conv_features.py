"""conv_features: the C++ op (kernels/memory_scan/cpu/conv_features.cpp) against the PyTorch reference.

Random inputs, outputs and the gradients of padded and weight, with and without the per-head
normalisation, for sequences shorter than the kernel, one row block and several (the weight
gradient's fixed split); fp64 to 1e-12, fp32 to 1e-5; bf16 inputs against the fp64 reference within
one bf16 rounding (the op sums and activates in fp32 and rounds once). A head whose features are
all zero takes F.normalize's eps branch. `auto` runs the C++ op on CPU, the reference when the
extension cannot load (and for no steps at all). The bits do not depend on the thread count.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from titans_train.kernels import conv_features
from titans_train.kernels.memory_scan.cpu import ExtensionBuildError

KERNEL = 4


def inputs(batch, seq_len, channels, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    padded = torch.randn(batch, KERNEL - 1 + seq_len, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, KERNEL, generator=generator, dtype=torch.float64)
    grad = torch.randn(batch, seq_len, channels, generator=generator, dtype=torch.float64)
    return padded.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), grad.to(dtype)


def run(implementation, padded, weight, grad, head_dim):
    out = conv_features(padded, weight, head_dim, implementation)
    return (out, *torch.autograd.grad(out, (padded, weight), grad))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch, seq_len, head_dim", [(2, 1, 0), (2, 2, 4), (1, 37, 8), (3, 130, 0), (2, 130, 16)])
def test_cpp_equals_reference(dtype, tolerance, batch, seq_len, head_dim):
    padded, weight, grad = inputs(batch, seq_len, 32, dtype, seed=seq_len + head_dim)
    got = run("cpp", padded, weight, grad, head_dim)
    want = run("reference", padded, weight, grad, head_dim)
    for name, g, w in zip(("out", "grad padded", "grad weight"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance, msg=name)


def test_zero_head_takes_the_eps_branch():
    """padded zero on one head's channels: features 0, out 0, and d out / d features = 1 / eps there."""
    padded, weight, grad = inputs(2, 9, 16, torch.float64, seed=1)
    with torch.no_grad():
        padded[..., :4] = 0
    padded.requires_grad_()
    got = run("cpp", padded, weight, grad, 4)
    want = run("reference", padded, weight, grad, 4)
    assert torch.count_nonzero(got[0][..., :4]) == 0
    assert got[1][..., :4].abs().max() > 1e6  # the gradient through silu'(0) = 1/2 and 1/eps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_dim", [0, 8])
def test_bf16_is_rounded_once(head_dim):
    """bf16 padded with fp32 weights (as under autocast): bf16 out within one rounding of the fp64
    reference; gradients in the inputs' dtypes, close to the fp64 ones."""
    padded, weight, grad = inputs(2, 70, 32, torch.float64, seed=5)
    low = padded.detach().bfloat16().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    out, grad_padded, grad_weight = run("cpp", low, weight32, grad.bfloat16(), head_dim)
    exact = run("reference", low.detach().double().requires_grad_(), weight32.detach().double().requires_grad_(),
                grad.bfloat16().double(), head_dim)
    assert (out.dtype, grad_padded.dtype, grad_weight.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.double(), exact[0], rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(grad_padded.double(), exact[1], rtol=2 ** -8, atol=1e-3 * exact[1].abs().max().item())
    torch.testing.assert_close(grad_weight.double(), exact[2], rtol=1e-5, atol=1e-4)


def test_auto_runs_cpp_on_cpu_and_the_reference_without_the_extension(monkeypatch):
    padded, weight, grad = inputs(1, 5, 8, torch.float64, seed=2)
    node = type(conv_features(padded, weight, 4).grad_fn).__name__
    assert node == "_CppConvFeaturesBackward"
    build_module = importlib.import_module("titans_train.kernels.memory_scan.cpu.build")

    def no_compiler():
        raise ExtensionBuildError("cannot build the memory_scan C++ extension (g++: not found); apt-get install g++")

    monkeypatch.setattr(build_module, "extension", no_compiler)
    build_module.extension_loads.cache_clear()
    try:
        with pytest.warns(UserWarning, match="run their PyTorch forms instead"):
            out = conv_features(padded, weight, 4)
        assert type(out.grad_fn).__name__ != "_CppConvFeaturesBackward"
        torch.testing.assert_close(out, conv_features(padded, weight, 4, "reference"), rtol=0, atol=0)
    finally:
        build_module.extension_loads.cache_clear()  # the real extension for the tests that follow


def test_bad_arguments_name_the_fix():
    padded, weight, _ = inputs(1, 5, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head_dim must be 0 .* divide the 8 channels"):
        conv_features(padded, weight, 3)
    with pytest.raises(ValueError, match="implementation must be one of"):
        conv_features(padded, weight, 0, "triton")


def test_same_bits_on_one_and_two_threads():
    """Rows are independent and the weight gradient sums fixed blocks of rows in order: the thread
    count does not change a bit."""
    padded, weight, grad = inputs(2, 300, 32, torch.float32, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run("cpp", padded, weight, grad, 8))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("implementation", ["cpp", "auto"])
def test_no_steps_give_empty_features_and_zero_gradients(implementation):
    padded, weight, grad = inputs(2, 0, 8, torch.float64, seed=4)
    got = run(implementation, padded, weight, grad, 4)
    assert got[0].shape == (2, 0, 8)
    assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[2]) == 0
