"""The C++ gate products (`cpu.cpp_stacked_gates`, gates.cpp) against PyTorch's `fused.stacked_gates`:
values and the gradients of theta, eta, alpha, ragged chunks, saturated gates, thread splits."""

from __future__ import annotations

import pytest
import torch

from test_memory_scan import graph_nodes, make_inputs, relative_error
from titans_train.kernels import memory_scan
from titans_train.kernels.memory_scan.cpu import cpp_stacked_gates
from titans_train.kernels.memory_scan.fused import ChunkGates, stacked_gates

BATCH, HEADS = 2, 3
# (chunk_size, seq_len): token by token, a ragged last chunk, whole chunks, T < chunk, a chunk of one token at the end.
CASES = [(1, 5), (4, 13), (8, 16), (16, 7), (5, 21)]


def make_gates(seq_len, seed, dtype=torch.float64):
    """Random gates in (0, 1) (theta too: the gate products accept any inner learning rate). theta
    is a transposed view, as the model's gate projections produce it (the op must not assume a layout)."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.rand(BATCH, seq_len, HEADS, generator=generator, dtype=torch.float64).transpose(1, 2)
    eta, alpha = (torch.rand(BATCH, HEADS, seq_len, generator=generator, dtype=torch.float64) for _ in range(2))
    return tuple(x.to(dtype) for x in (theta, eta, alpha))


def values_and_grads(gate_products, gates, chunk_size, seed):
    """The four outputs and the gradients of (theta, eta, alpha) for one random upstream gradient of all four."""
    gates = [x.detach().clone().requires_grad_() for x in gates]
    outputs = gate_products(*gates, chunk_size)
    generator = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype) for x in outputs]
    grads = torch.autograd.grad(outputs, gates, upstream)
    results = {name: x.detach() for name, x in zip(ChunkGates._fields, outputs)}
    results.update({f"grad {name}": x for name, x in zip(("theta", "eta", "alpha"), grads)})
    return results


def assert_equal_to_reference(actual, expected, tolerance):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].shape == value.shape and actual[name].dtype == value.dtype, name
        assert torch.isfinite(actual[name]).all(), name
        assert relative_error(actual[name], value) <= tolerance, f"{name}: {relative_error(actual[name], value):.3g}"


@pytest.mark.parametrize("chunk_size, seq_len", CASES, ids=[f"chunk{c}-T{t}" for c, t in CASES])
def test_cpp_gates_equal_stacked_gates(chunk_size, seq_len):
    """fp64: every output (the padded layout included) and every gate gradient, to rounding (the
    sums run in another order: recurrences instead of matmuls; measured <= ~1e-15). The cumulative
    products A, P and D_eta (times theta) are multiplied in the reference's order: the same bits."""
    gates = make_gates(seq_len, seed=chunk_size + seq_len)
    expected = values_and_grads(stacked_gates, gates, chunk_size, seed=1)
    actual = values_and_grads(cpp_stacked_gates, gates, chunk_size, seed=1)
    assert_equal_to_reference(actual, expected, 1e-13)
    assert torch.equal(actual["retrieval_decays"][..., 0], expected["retrieval_decays"][..., 0])  # A_t
    assert torch.equal(actual["state_decays"][..., ::2], expected["state_decays"][..., ::2])  # A_l, P_l
    assert torch.equal(actual["state_rows"][..., 1], expected["state_rows"][..., 1])  # D_eta[l, i] theta_i


def test_cpp_gates_in_fp32_match_the_fp64_reference():
    """fp32 against fp64 on the same (fp32-representable) gates: a product or sum of at most n = 16
    terms in (0, 1) carries at most ~n roundings of 2^-24 (1e-6); the bound leaves a factor ten."""
    gates = make_gates(37, seed=5, dtype=torch.float32)
    expected = values_and_grads(stacked_gates, tuple(x.double() for x in gates), 16, seed=2)
    actual = values_and_grads(cpp_stacked_gates, gates, 16, seed=2)
    for name, value in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert relative_error(actual[name], value) <= 1e-5, f"{name}: {relative_error(actual[name], value):.3g}"


def saturated_gates(seq_len, seed):
    """Gates at exactly 0 and 1: eta 0 (momentum dropped), alpha 1 (all forgotten), alpha 0, theta 0,
    within a chunk, twice in a row and at a chunk's last token (chunk 4)."""
    theta, eta, alpha = (x.clone() for x in make_gates(seq_len, seed))
    eta[..., [2, 6, 7, 11]] = 0.0
    eta[..., [3, 9]] = 1.0
    alpha[..., [1, 5, 6, 12]] = 1.0
    alpha[..., [0, 8, 15]] = 0.0
    theta[..., [4, 10]] = 0.0
    return theta, eta, alpha


ABLATIONS = {
    "saturated tokens": saturated_gates,
    "momentum ablated (eta * 0)": lambda seq_len, seed: (lambda t, e, a: (t, e * 0, a))(*make_gates(seq_len, seed)),
    "decay ablated (alpha * 0)": lambda seq_len, seed: (lambda t, e, a: (t, e, a * 0))(*make_gates(seq_len, seed)),
}


@pytest.mark.parametrize("case", ABLATIONS)
def test_saturated_gates_give_exact_zeros_and_finite_exact_gradients(case):
    """At gates of exactly 0 and 1 the products are exact zeros and the gradients finite and equal to
    autograd's through the reference's cumulative products (exact at zeros: no division, no logs)."""
    seq_len, chunk_size = 17, 4
    gates = ABLATIONS[case](seq_len, seed=3)
    expected = values_and_grads(stacked_gates, gates, chunk_size, seed=4)
    actual = values_and_grads(cpp_stacked_gates, gates, chunk_size, seed=4)
    assert_equal_to_reference(actual, expected, 1e-13)
    for name in ChunkGates._fields:  # the same zeros, exactly
        assert torch.equal(actual[name] == 0, expected[name] == 0), name
    if case.startswith("momentum"):  # P_t = 0 in every chunk; E_t = D_alpha P = 0
        assert (actual["state_decays"][..., 1:] == 0).all() and (actual["retrieval_decays"][..., 1] == 0).all()


def test_gradcheck():
    """An oracle-independent check of the hand-written backward (finite differences, fp64), with a
    ragged last chunk and a saturated gate."""
    theta, eta, alpha = (x[:1, :2].clone() for x in make_gates(7, seed=6))
    eta[..., 2], alpha[..., 4] = 0.0, 1.0
    inputs = [x.requires_grad_() for x in (theta, eta, alpha)]
    assert torch.autograd.gradcheck(lambda *gates: cpp_stacked_gates(*gates, 3), inputs)


def test_thread_split_does_not_change_a_bit():
    """(group, chunk) pairs split over 2 threads (3 x 5 = 15 of chunk 64: 8 and 7) give the 1-thread bits."""
    generator = torch.Generator().manual_seed(7)
    gates = [torch.rand(1, 3, 300, generator=generator) for _ in range(3)]
    threads = torch.get_num_threads()
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            results.append(values_and_grads(cpp_stacked_gates, gates, 64, seed=8))
        finally:
            torch.set_num_threads(threads)
    for name, value in results[0].items():
        assert torch.equal(results[1][name], value), name


def test_cpp_memory_scan_runs_the_cpp_gates_and_fused_the_reference():
    tensors, weights, momentum = make_inputs(9, 1, torch.float64, seed=3)
    tensors = [x.requires_grad_() for x in tensors]
    nodes = {}
    for implementation in ("cpp", "fused"):
        y, _ = memory_scan(*tensors, weights, momentum, chunk_size=4, implementation=implementation)
        nodes[implementation] = {type(node).__name__ for node in graph_nodes(y)}
    assert "CppStackedGatesBackward" in nodes["cpp"] and "CumprodBackward0" not in nodes["cpp"]
    assert "CppStackedGatesBackward" not in nodes["fused"] and "CumprodBackward0" in nodes["fused"]
