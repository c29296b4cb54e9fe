"""The Triton memory_scan kernels against the PyTorch reference, run by the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported; tests/conftest.py does it for the
whole session (other test modules import triton indirectly).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._pytree import tree_leaves

from test_memory_scan import make_inputs, relative_error, run_with_grads
from titans_train.kernels import memory_scan

pytest.importorskip("triton")

# (dim, chunk_size, seq_len, depth, retrieve, residual, activation). Every seq_len leaves a ragged
# last chunk; the first eight cover the option grid at the smallest tile, the rest the sizes
# (head dims 16-128, chunks 16-256, a chunk that is not a power of two, a sequence shorter than a chunk).
CASES = [
    (16, 16, 37, depth, retrieve, residual, "gelu" if (depth + residual) % 2 else "silu")
    for depth in (1, 2) for retrieve in ("token", "chunk") for residual in (True, False)
] + [
    (32, 48, 100, 2, "token", True, "silu"),
    (64, 64, 150, 1, "token", False, "gelu"),
    (128, 256, 300, 1, "token", True, "silu"),
    (64, 32, 20, 2, "chunk", True, "gelu"),
    (128, 16, 40, 2, "token", False, "gelu"),
]


def case_id(case):
    dim, chunk_size, seq_len, depth, retrieve, residual, activation = case
    return f"d{dim}-chunk{chunk_size}-T{seq_len}-depth{depth}-{retrieve}-{'residual' if residual else 'plain'}-{activation}"


def compare_with_reference(case, seed, sequence_dtype, tolerance):
    """Triton (q, k, v and gates in `sequence_dtype`, state fp32) against the fused reference in
    fp64 on the same values, with the same upstream gradient: outputs, final state, every gradient."""
    dim, chunk_size, seq_len, depth, retrieve, residual, activation = case
    tensors, weights, momentum = make_inputs(seq_len, depth, torch.float64, seed, batch=1, heads=2, dim=dim)
    tensors = tuple(x.to(sequence_dtype) for x in tensors)
    weights, momentum = (tuple(x.float() for x in group) for group in (weights, momentum))
    options = dict(chunk_size=chunk_size, retrieve=retrieve, activation=activation, residual=residual)
    actual = run_with_grads(memory_scan, tensors, weights, momentum, seed + 1, implementation="triton", **options)
    as_fp64 = lambda xs: tuple(x.double() for x in xs)  # noqa: E731
    expected = run_with_grads(memory_scan, as_fp64(tensors), as_fp64(weights), as_fp64(momentum), seed + 1,
                              implementation="fused", **options)
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        wanted_dtype = sequence_dtype if name in ("y", *(f"grad {n}" for n in "q k v theta eta alpha".split())) \
            else torch.float32
        assert value.dtype == wanted_dtype, name
        assert torch.isfinite(value).all(), name
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.3g} > {tolerance:g}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fp32_matches_reference(case):
    compare_with_reference(case, seed=CASES.index(case), sequence_dtype=torch.float32, tolerance=1e-4)


# bf16 q, k, v and gates, fp32 state (the autocast policy): the reference gets the same bf16
# values in fp64, so only our rounding counts. The kernel computes in fp32 and rounds y and the
# gradients of the bf16 inputs once at the store: at most 2^-9 of each entry's magnitude, plus the
# fp32 error (< 1e-5 on the fp32 grid); 2^-8 leaves a factor two. (The gates' gradients are
# rounded once too, by autograd's cast back to bf16.)
BF16_TOLERANCE = 2.0**-8
BF16_CASES = [CASES[4], CASES[3], CASES[8]]


@pytest.mark.parametrize("case", BF16_CASES, ids=[case_id(c) for c in BF16_CASES])
def test_bf16_inputs_match_reference(case):
    compare_with_reference(case, seed=100 + CASES.index(case), sequence_dtype=torch.bfloat16,
                           tolerance=BF16_TOLERANCE)


def test_auto_dispatch_keeps_the_reference_on_cpu(monkeypatch):
    """implementation='auto' (the default) on CPU is the fused reference, interpreter or not."""
    scan_module = importlib.import_module("titans_train.kernels.memory_scan.scan")  # the name is shadowed

    def no_triton():
        raise AssertionError("auto dispatched a CPU input to triton")

    monkeypatch.setattr(scan_module, "_triton_scan", no_triton)
    tensors, weights, momentum = make_inputs(9, 1, torch.float32, 0, batch=1, heads=1, dim=16)
    memory_scan(*tensors, weights, momentum, chunk_size=4)


@pytest.mark.parametrize("problem", ["depth3", "fp64", "cpu-without-interpreter"])
def test_unsupported_triton_inputs_raise_a_clear_error(problem, monkeypatch):
    depth = 3 if problem == "depth3" else 1
    dtype = torch.float64 if problem == "fp64" else torch.float32
    if problem == "cpu-without-interpreter":
        monkeypatch.delenv("TRITON_INTERPRET")
    tensors, weights, momentum = make_inputs(9, depth, dtype, 0, batch=1, heads=1, dim=16)
    weights, momentum = (tuple(x.to(dtype) for x in group) for group in (weights, momentum))
    expected = {"depth3": "memory depth", "fp64": "fp32, bf16 or fp16", "cpu-without-interpreter": "CUDA tensors"}
    with pytest.raises(ValueError, match=expected[problem]):
        memory_scan(*tensors, weights, momentum, chunk_size=4, implementation="triton")


def test_inference_saves_nothing_and_gives_the_same_result():
    """Without a backward to come the forward skips the saved states; y and the state are unchanged."""
    tensors, weights, momentum = make_inputs(37, 2, torch.float32, 5, batch=1, heads=2, dim=16)
    weights, momentum = (tuple(x.float().requires_grad_() for x in group) for group in (weights, momentum))
    training = memory_scan(*tensors, weights, momentum, chunk_size=16, implementation="triton")
    with torch.no_grad():
        inference = memory_scan(*tensors, weights, momentum, chunk_size=16, implementation="triton")
    for got, want in zip(tree_leaves(inference), tree_leaves(training)):
        assert torch.equal(got, want.detach())


def test_kernels_read_no_unwritten_memory(monkeypatch):
    """Every buffer the launchers allocate uninitialised starts as NaN: a kernel reading a row it did
    not write (a ragged chunk's padding, a saved state) would put NaN into the results."""
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *shape, **kw: new_empty(self, *shape, **kw).fill_(float("nan")))
    compare_with_reference(CASES[4], seed=7, sequence_dtype=torch.float32, tolerance=1e-4)


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_model_with_triton_memory_equals_the_reference(variant, monkeypatch):
    """TitansLM with every memory_scan call on the Triton kernels: the CPU kernel's (cpp) logits and gradients."""
    from test_model import tiny_model, token_ids

    scan_module = importlib.import_module("titans_train.kernels.memory_scan.scan")
    resolve = scan_module._resolve_implementation
    model = tiny_model(variant).float()
    ids = token_ids()

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    expected = logits_and_grads()
    calls = []

    def triton_everywhere(implementation, tensors, depth):
        calls.append(resolve(implementation, tensors, depth))
        return "triton"

    monkeypatch.setattr(scan_module, "_resolve_implementation", triton_everywhere)
    actual = logits_and_grads()
    assert calls and set(calls) == {"cpp"}  # what auto would have picked on CPU
    for got, want in zip(actual, expected):
        assert relative_error(got, want) <= 1e-4
