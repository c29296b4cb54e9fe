"""The chunked memory_scan against the token-by-token oracle: outputs, final state, every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from titans_train.kernels import memory_scan, memory_scan_sequential

BATCH, HEADS, DIM, EXPANSION = 2, 2, 4, 2


def make_inputs(seq_len, depth, dtype, seed, batch=BATCH, heads=HEADS, dim=DIM):
    """Random inputs in the ranges the model produces: unit-norm q and k, gates in (0, 1).

    theta stays below 0.5: larger inner learning rates make the inner gradient descent diverge
    within a few dozen tokens, and a diverging recurrence amplifies rounding beyond any tolerance.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    q = torch.nn.functional.normalize(randn(batch, heads, seq_len, dim), dim=-1)
    k = torch.nn.functional.normalize(randn(batch, heads, seq_len, dim), dim=-1)
    v = randn(batch, heads, seq_len, dim)
    theta, eta, alpha = 0.5 * rand(batch, heads, seq_len), rand(batch, heads, seq_len), rand(batch, heads, seq_len)
    widths = [dim] + [dim * EXPANSION] * (depth - 1) + [dim]
    weights = tuple(randn(batch, heads, widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(depth))
    momentum = tuple(0.1 * randn(batch, heads, widths[i + 1], widths[i]) for i in range(depth))
    return tuple(x.to(dtype) for x in (q, k, v, theta, eta, alpha)), weights, momentum


INPUT_NAMES = ("q", "k", "v", "theta", "eta", "alpha")


def run_with_grads(scan, tensors, weights, momentum, upstream_seed, **options):
    """Outputs and the gradients of every input for one random upstream gradient of (y, final state)."""
    tensors = [x.detach().clone().requires_grad_() for x in tensors]
    weights = [w.detach().clone().requires_grad_() for w in weights]
    momentum = [s.detach().clone().requires_grad_() for s in momentum]
    y, (weights_out, momentum_out) = scan(*tensors, tuple(weights), tuple(momentum), **options)
    outputs = [y, *weights_out, *momentum_out]
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in outputs]
    loss = sum((x.double() * g).sum() for x, g in zip(outputs, upstream))
    loss.backward()
    results = {"y": y}
    results.update({f"weights_out[{i}]": w for i, w in enumerate(weights_out)})
    results.update({f"momentum_out[{i}]": s for i, s in enumerate(momentum_out)})
    results.update({f"grad {name}": x.grad for name, x in zip(INPUT_NAMES, tensors)})
    results.update({f"grad weights[{i}]": w.grad for i, w in enumerate(weights)})
    results.update({f"grad momentum[{i}]": s.grad for i, s in enumerate(momentum)})
    return {name: x.detach() for name, x in results.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp64."""
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def assert_close_to_oracle(dtype, seq_len, depth, tolerance, seed, **options):
    tensors, weights, momentum = make_inputs(seq_len, depth, torch.float64, seed)
    oracle_options = {name: x for name, x in options.items() if name != "implementation"}
    expected = run_with_grads(memory_scan_sequential, tensors, weights, momentum, seed + 1, **oracle_options)
    cast = lambda xs: tuple(x.to(dtype) for x in xs)  # noqa: E731
    actual = run_with_grads(memory_scan, cast(tensors), cast(weights), cast(momentum), seed + 1, **options)
    assert actual.keys() == expected.keys()
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    for name in expected:
        assert actual[name].dtype == dtype or name.startswith("grad"), name
        assert torch.isfinite(actual[name]).all(), name
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.3g} > {tolerance:g}"


GRID = list(itertools.product([1, 2, 5, 16], [1, 7, 33], [1, 2, 3], ["token", "chunk"], [True, False]))


def grid_id(case):
    chunk_size, seq_len, depth, retrieve, residual = case
    return f"chunk{chunk_size}-T{seq_len}-depth{depth}-{retrieve}-{'residual' if residual else 'plain'}"


def test_public_op_is_the_chunked_form():
    assert memory_scan is not memory_scan_sequential


TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
# The fused kernel (the default) on the whole grid in both dtypes; the autograd form in fp64.
VARIANTS = [("fused", torch.float64), ("fused", torch.float32), ("autograd", torch.float64)]


@pytest.mark.parametrize(
    "implementation, dtype", VARIANTS, ids=[f"{i}-{str(d).removeprefix('torch.')}" for i, d in VARIANTS]
)
@pytest.mark.parametrize("case_index", range(len(GRID)), ids=[grid_id(c) for c in GRID])
def test_matches_oracle(case_index, implementation, dtype):
    """The oracle runs in fp64 on the same values, so an fp32 case measures only our rounding."""
    chunk_size, seq_len, depth, retrieve, residual = GRID[case_index]
    # Both activations get covered across the grid without doubling it.
    activation = "gelu" if (chunk_size + seq_len + depth) % 2 else "silu"
    assert_close_to_oracle(
        dtype, seq_len, depth, TOLERANCES[dtype], seed=case_index,
        chunk_size=chunk_size, retrieve=retrieve, activation=activation, residual=residual,
        implementation=implementation,
    )
