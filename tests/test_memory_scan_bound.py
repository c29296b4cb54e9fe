"""memory_scan's surprise bound (kernels/memory_scan/README.md, "The surprise bound") in every
implementation against the token-by-token oracle: outputs, final state, every input's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from test_memory_scan import make_inputs, relative_error, run_with_grads
from titans_train.kernels import memory_mlp, memory_scan, memory_scan_sequential
from titans_train.model import ConfigError, TitansConfig

SEQ_LEN, CHUNK = 11, 4  # a ragged last chunk of 3
CPU_IMPLEMENTATIONS = ("autograd", "fused", "cpp")
# (depth, retrieve, activation, residual)
CASES = [(1, "token", "silu", True), (1, "chunk", "silu", True), (2, "token", "silu", True),
         (2, "chunk", "gelu", False), (2, "token", "gelu", False)]


def token_surprise_norms(weights, k, v, activation, residual):
    """||u_t|| (B, H, n) of the inner-loss gradient of every token of k, v (B, H, n, d) at `weights`,
    all layers together, by autograd (independently of the kernels' closed form)."""
    norms = []
    for t in range(k.shape[2]):
        leaves = [w.detach().requires_grad_() for w in weights]
        loss = 0.5 * (memory_mlp(leaves, k[:, :, t:t + 1], activation, residual) - v[:, :, t:t + 1]).pow(2).sum()
        norms.append(sum(g.pow(2).sum((-2, -1)) for g in torch.autograd.grad(loss, leaves)).sqrt())
    return torch.stack(norms, dim=-1)


def bounded_norms(tensors, weights, momentum, bound, chunk_size, activation, residual):
    """||u_t|| (B, H, T) of every token at the chunk-start weights of the scan bounded by `bound`."""
    q, k, v, *_ = tensors
    norms = []
    for start in range(0, k.shape[2], chunk_size):
        state = weights
        if start:  # the chunk-start weights: the bounded oracle over the chunks before
            _, (state, _) = memory_scan_sequential(
                *(x[:, :, :start] for x in tensors), weights, momentum, chunk_size=chunk_size,
                activation=activation, residual=residual, surprise_bound=bound)
        stop = start + chunk_size
        norms.append(token_surprise_norms(state, k[:, :, start:stop], v[:, :, start:stop], activation, residual))
    return torch.cat(norms, dim=-1)


def bounded_case(depth, activation, residual, seq_len, chunk_size, seed, dim=4):
    """fp64 inputs and a bound that clips between a quarter and three quarters of the tokens along
    the bounded scan (checked): the median norm, iterated, since the bound changes the trajectory."""
    tensors, weights, momentum = make_inputs(seq_len, depth, torch.float64, seed, batch=1, heads=2, dim=dim)
    _, k, v, *_ = tensors
    bound = token_surprise_norms(weights, k, v, activation, residual).median().item()
    for _ in range(3):
        norms = bounded_norms(tensors, weights, momentum, bound, chunk_size, activation, residual)
        fraction = (norms > bound).double().mean().item()
        if 0.25 <= fraction <= 0.75:
            return tensors, weights, momentum, bound
        bound = norms.median().item()
    raise AssertionError(f"the bound {bound:.3g} clips {fraction:.0%} of the tokens")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_cpu_implementation_equals_the_bounded_oracle(case):
    depth, retrieve, activation, residual = case
    tensors, weights, momentum, bound = bounded_case(depth, activation, residual, SEQ_LEN, CHUNK, seed=CASES.index(case))
    options = dict(chunk_size=CHUNK, retrieve=retrieve, activation=activation, residual=residual)
    expected = run_with_grads(memory_scan_sequential, tensors, weights, momentum, 1, surprise_bound=bound, **options)
    unbounded = run_with_grads(memory_scan_sequential, tensors, weights, momentum, 1, **options)
    # The bound changes the result (so the comparison below can fail), every gradient included.
    for name in expected:
        if not name.startswith("grad momentum"):  # S^c's gradient only sees the decays, not u
            assert relative_error(unbounded[name], expected[name]) > 1e-3, name
    for implementation in CPU_IMPLEMENTATIONS:
        actual = run_with_grads(memory_scan, tensors, weights, momentum, 1, surprise_bound=bound,
                                implementation=implementation, **options)
        errors = {name: relative_error(actual[name], expected[name]) for name in expected}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-9, f"{implementation} {worst}: relative error {errors[worst]:.3g}"


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_a_bound_above_every_norm_equals_the_unbounded_scan_exactly(implementation):
    tensors, weights, momentum = make_inputs(SEQ_LEN, 2, torch.float64, seed=5, batch=1, heads=2)
    options = dict(chunk_size=CHUNK, implementation=implementation)
    expected = run_with_grads(memory_scan, tensors, weights, momentum, 1, **options)
    actual = run_with_grads(memory_scan, tensors, weights, momentum, 1, surprise_bound=1e30, **options)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_cpp_equals_fused_bit_for_bit_under_the_bound(monkeypatch):
    """The chunk loops alone: fused runs with the C++ gate products, as in test_memory_scan.py."""
    from titans_train.kernels.memory_scan import fused as fused_module
    from titans_train.kernels.memory_scan.cpu import cpp_stacked_gates

    tensors, weights, momentum = make_inputs(SEQ_LEN, 2, torch.float32, seed=6, batch=1, heads=2)
    weights, momentum = (tuple(x.float() for x in group) for group in (weights, momentum))
    options = dict(chunk_size=CHUNK, surprise_bound=0.5)
    actual = run_with_grads(memory_scan, tensors, weights, momentum, 1, implementation="cpp", **options)
    monkeypatch.setattr(fused_module, "stacked_gates", cpp_stacked_gates)
    expected = run_with_grads(memory_scan, tensors, weights, momentum, 1, implementation="fused", **options)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("bound", [-1.0, math.nan, math.inf, True, "1"])
def test_a_bad_bound_is_a_clear_error(bound):
    tensors, weights, momentum = make_inputs(SEQ_LEN, 1, torch.float64, seed=0, batch=1, heads=1)
    with pytest.raises(ValueError, match="surprise_bound must be a finite number >= 0"):
        memory_scan(*tensors, weights, momentum, chunk_size=CHUNK, surprise_bound=bound)
    with pytest.raises(ConfigError, match="surprise_bound"):
        TitansConfig(variant="lmm", dim=16, n_layers=1, n_heads=2, chunk_size=4, surprise_bound=bound)


def test_a_recipe_override_with_a_bad_bound_names_the_key():
    from titans_train.config import InvalidValueError, load_recipe

    assert load_recipe("debug", []).model.surprise_bound == 0.0
    with pytest.raises(InvalidValueError, match="model.surprise_bound.*finite number >= 0"):
        load_recipe("debug", ["model.surprise_bound=-1"])


def test_the_model_passes_its_bound_to_the_memory():
    from titans_train.model import TitansLM

    config = dict(variant="lmm", vocab_size=32, dim=16, n_layers=1, n_heads=2, memory_expansion=2, chunk_size=4,
                  theta_max=0.5)
    tokens = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for bound in (0.0, 1e30, 1e-3):
        model = TitansLM(TitansConfig(**config, surprise_bound=bound), init_seed=0).double()
        logits[bound] = model(tokens).logits
    assert torch.equal(logits[1e30], logits[0.0])
    assert relative_error(logits[1e-3], logits[0.0]) > 1e-6


def test_the_scan_schedule_refuses_a_bound():
    """sp_schedule=scan composes affine span maps; a bound makes the span's effect depend on the state."""
    from titans_train.parallel.layout import ParallelConfigError
    from titans_train.parallel.validation import validate_sp_schedule

    config = dict(variant="lmm", dim=16, n_layers=1, n_heads=2, chunk_size=4, memory_depth=1)
    validate_sp_schedule(TitansConfig(**config), "scan", sp=2, seq_len=32)
    with pytest.raises(ParallelConfigError, match="model.surprise_bound = 1.0 .*parallel.sp_schedule=relay"):
        validate_sp_schedule(TitansConfig(**config, surprise_bound=1.0), "scan", sp=2, seq_len=32)


TRITON_CASES = [(16, 16, 37, 1, "chunk", True, "silu"), (16, 16, 37, 2, "token", False, "gelu")]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"depth{c[3]}-{c[4]}")
def test_triton_equals_the_bounded_reference(case):
    """Triton in fp32 (interpreted) against `fused` in fp64, itself checked against the oracle above."""
    pytest.importorskip("triton")
    dim, chunk_size, seq_len, depth, retrieve, residual, activation = case
    tensors, weights, momentum, bound = bounded_case(depth, activation, residual, seq_len, chunk_size, seed=3, dim=dim)
    options = dict(chunk_size=chunk_size, retrieve=retrieve, activation=activation, residual=residual,
                   surprise_bound=bound)
    expected = run_with_grads(memory_scan, tensors, weights, momentum, 2, implementation="fused", **options)
    as_fp32 = lambda xs: tuple(x.float() for x in xs)  # noqa: E731
    actual = run_with_grads(memory_scan, as_fp32(tensors), as_fp32(weights), as_fp32(momentum), 2,
                            implementation="triton", **options)
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: relative error {errors[worst]:.3g}"
