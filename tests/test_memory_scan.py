"""The chunked memory_scan against the token-by-token oracle: outputs, final state, every gradient."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch.utils._pytree import tree_leaves

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
    # bf16-representable, so a bf16 output receives exactly the upstream gradient the oracle gets.
    upstream = [
        torch.randn(x.shape, generator=generator, dtype=torch.float64).bfloat16().double() for x in outputs
    ]
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


def rounded_inputs(dtype, seq_len, depth, seed):
    """fp64 inputs holding values representable in `dtype`."""
    return tuple(
        tuple(x.to(dtype).double() for x in group) for group in make_inputs(seq_len, depth, torch.float64, seed)
    )


@functools.lru_cache(maxsize=None)
def oracle_results(dtype, seq_len, depth, seed, options):
    """The oracle's outputs and gradients, shared by the implementations tested on the same case."""
    tensors, weights, momentum = rounded_inputs(dtype, seq_len, depth, seed)
    return run_with_grads(memory_scan_sequential, tensors, weights, momentum, seed + 1, **dict(options))


def assert_close_to_oracle(dtype, seq_len, depth, tolerance, seed, values_dtype=torch.float32, **options):
    """The oracle runs in fp64 on the same values, all representable in `values_dtype` (at least as
    wide as `dtype`), so only our rounding counts; one oracle run serves every implementation."""
    tensors, weights, momentum = rounded_inputs(values_dtype, seq_len, depth, seed)
    oracle_options = tuple(sorted((name, x) for name, x in options.items() if name != "implementation"))
    expected = oracle_results(values_dtype, seq_len, depth, seed, oracle_options)
    cast = lambda xs: tuple(x.to(dtype) for x in xs)  # noqa: E731
    actual = run_with_grads(memory_scan, cast(tensors), cast(weights), cast(momentum), seed + 1, **options)
    assert actual.keys() == expected.keys()
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    for name in expected:
        assert actual[name].dtype == dtype, name
        assert torch.isfinite(actual[name]).all(), name
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.3g} > {tolerance:g}"


GRID = list(itertools.product([1, 2, 5, 16], [1, 7, 33], [1, 2, 3], ["token", "chunk"], [True, False]))


def grid_id(case):
    chunk_size, seq_len, depth, retrieve, residual = case
    return f"chunk{chunk_size}-T{seq_len}-depth{depth}-{retrieve}-{'residual' if residual else 'plain'}"


def graph_nodes(output):
    """Every autograd node from `output` back to the leaves."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


SCAN_NODES = {"fused": "FusedChunkedScanBackward", "cpp": "CppChunkedScanBackward"}


@pytest.mark.parametrize("implementation, node", [("auto", "cpp"), ("fused", "fused"), ("cpp", "cpp")])
def test_public_op_runs_the_chosen_chunked_kernel(implementation, node):
    """memory_scan runs the chunk loop asked for (its autograd node is in the graph), not the oracle;
    on CPU `auto` is the C++ kernel, which must build here (a failure to load fails the test)."""
    tensors, weights, momentum = make_inputs(9, 2, torch.float64, seed=3)
    y, _ = memory_scan(*(x.requires_grad_() for x in tensors), weights, momentum, chunk_size=4,
                       implementation=implementation)
    assert SCAN_NODES[node] in {type(seen).__name__ for seen in graph_nodes(y)}


TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
# The chunk kernels (cpp the CPU default, fused its reference) on the whole grid in both dtypes; the
# autograd form in fp64.
VARIANTS = [("cpp", torch.float64), ("cpp", torch.float32), ("fused", torch.float64), ("fused", torch.float32),
            ("autograd", torch.float64)]


@pytest.mark.parametrize(
    "implementation, dtype", VARIANTS, ids=[f"{i}-{str(d).removeprefix('torch.')}" for i, d in VARIANTS]
)
@pytest.mark.parametrize("case_index", range(len(GRID)), ids=[grid_id(c) for c in GRID])
def test_matches_oracle(case_index, implementation, dtype):
    chunk_size, seq_len, depth, retrieve, residual = GRID[case_index]
    # Both activations get covered across the grid without doubling it.
    activation = "gelu" if (chunk_size + seq_len + depth) % 2 else "silu"
    assert_close_to_oracle(
        dtype, seq_len, depth, TOLERANCES[dtype], seed=case_index,
        chunk_size=chunk_size, retrieve=retrieve, activation=activation, residual=residual,
        implementation=implementation,
    )


# bf16 inputs are computed in fp32 and y, the state and the gradients are rounded once to bf16:
# a rounding to nearest moves each entry by at most 2^-9 of its magnitude, so max|error| / max|ref|
# stays below 2^-9 plus the fp32 error (~1e-6, see the fp32 grid); 2^-8 leaves a factor two.
BF16_TOLERANCE = 2.0**-8
BF16_CASES = [(5, 33, 2, "token", True), (16, 33, 3, "token", False), (2, 7, 1, "chunk", True)]


@pytest.mark.parametrize("case", BF16_CASES, ids=[grid_id(c) for c in BF16_CASES])
def test_bf16_matches_fp64_oracle(case):
    chunk_size, seq_len, depth, retrieve, residual = case
    assert_close_to_oracle(
        torch.bfloat16, seq_len, depth, BF16_TOLERANCE, seed=1000 + chunk_size, values_dtype=torch.bfloat16,
        chunk_size=chunk_size, retrieve=retrieve, residual=residual,
    )


@pytest.mark.parametrize("implementation", ["cpp", "fused", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_saturated_gates_stay_finite(implementation, dtype):
    """alpha = 1 (forget everything) and eta = 0 (drop the momentum), exactly, at some tokens.

    bf16 gates reach these values already for sigmoid logits beyond about 6. Values and every
    gradient, including those with respect to the saturated gates, match the oracle.
    """
    seq_len, depth, chunk_size = 17, 2, 4
    (q, k, v, theta, eta, alpha), weights, momentum = make_inputs(seq_len, depth, torch.float64, seed=7)
    forget, drop = torch.zeros(seq_len, dtype=torch.bool), torch.zeros(seq_len, dtype=torch.bool)
    forget[[1, 5, 6, 12]] = True  # within a chunk, twice in a row, at a chunk's last token
    drop[[2, 6, 11, 16]] = True
    alpha = alpha.masked_fill(forget, 1.0)
    eta = eta.masked_fill(drop, 0.0)
    tensors = (q, k, v, theta, eta, alpha)
    options = dict(chunk_size=chunk_size, activation="silu", residual=True)
    expected = run_with_grads(memory_scan_sequential, tensors, weights, momentum, 3, **options)
    cast = lambda xs: tuple(x.to(dtype) for x in xs)  # noqa: E731
    actual = run_with_grads(
        memory_scan, cast(tensors), cast(weights), cast(momentum), 3, implementation=implementation, **options
    )
    for name, value in actual.items():
        assert torch.isfinite(value).all(), name
        assert relative_error(value, expected[name]) <= TOLERANCES[dtype], name


SPLIT_POINTS = [5, 10, 30]


@pytest.mark.parametrize("implementation", ["cpp", "fused", "autograd"])
@pytest.mark.parametrize("split", SPLIT_POINTS, ids=[f"split{s}" for s in SPLIT_POINTS])
def test_split_and_continue_equals_whole(split, implementation):
    """Two calls chained through the returned state equal one call: values and every gradient.

    Sequence parallelism relies on it: a span's final state is the next span's initial state, and
    the gradient of that state flows back across the boundary.
    """
    seq_len, depth, chunk_size = 33, 2, 5
    tensors, weights, momentum = make_inputs(seq_len, depth, torch.float64, seed=11)
    options = dict(chunk_size=chunk_size, retrieve="token", activation="gelu", residual=True,
                   implementation=implementation)
    whole = run_with_grads(memory_scan, tensors, weights, momentum, 5, **options)

    def in_two_pieces(q, k, v, theta, eta, alpha, weights, momentum, **options):
        first = (x[:, :, :split] for x in (q, k, v, theta, eta, alpha))
        second = (x[:, :, split:] for x in (q, k, v, theta, eta, alpha))
        y_first, (mid_weights, mid_momentum) = memory_scan(*first, weights, momentum, **options)
        y_second, state = memory_scan(*second, mid_weights, mid_momentum, **options)
        return torch.cat((y_first, y_second), dim=2), state

    pieces = run_with_grads(in_two_pieces, tensors, weights, momentum, 5, **options)
    for name in whole:
        assert relative_error(pieces[name], whole[name]) <= 1e-12, name


def test_empty_sequence_returns_the_state():
    (q, k, v, theta, eta, alpha), weights, momentum = make_inputs(0, 2, torch.float64, seed=0)
    weights, momentum = tuple(w.requires_grad_() for w in weights), tuple(s.requires_grad_() for s in momentum)
    y, (weights_out, momentum_out) = memory_scan(
        q, k, v, theta, eta, alpha, weights, momentum, chunk_size=4
    )
    assert y.shape == q.shape and y.dtype == q.dtype
    assert all(torch.equal(a, b) for a, b in zip(weights_out + momentum_out, weights + momentum))
    # The state passes through unchanged, so its gradient does too.
    upstream = [torch.randn_like(state) for state in weights_out + momentum_out]
    grads = torch.autograd.grad(weights_out + momentum_out, weights + momentum, upstream)
    assert all(torch.equal(grad, expected) for grad, expected in zip(grads, upstream))


def test_autograd_form_has_second_derivatives():
    """The autograd form is differentiable twice (act' is built from differentiable ops)."""
    tensors, weights, momentum = make_inputs(5, 2, torch.float64, seed=3, batch=1, heads=1, dim=2)
    inputs = [x.clone().requires_grad_() for x in (*tensors, *weights, *momentum)]

    def scan(*inputs):
        y, (w, s) = memory_scan(
            *inputs[:6], inputs[6:8], inputs[8:], chunk_size=2, activation="gelu", implementation="autograd"
        )
        return y, *w, *s

    assert torch.autograd.gradgradcheck(scan, inputs, fast_mode=True)


@pytest.mark.parametrize("implementation", ["cpp", "fused"])
def test_hand_written_backward_matches_finite_differences(implementation):
    """An oracle-independent check of the hand-written backward."""
    tensors, weights, momentum = make_inputs(7, 3, torch.float64, seed=4, batch=1, heads=2, dim=2)
    inputs = [x.clone().requires_grad_() for x in (*tensors, *weights, *momentum)]

    def scan(*inputs):
        y, (w, s) = memory_scan(*inputs[:6], inputs[6:9], inputs[9:], chunk_size=3, activation="silu",
                                implementation=implementation)
        return y, *w, *s

    assert torch.autograd.gradcheck(scan, inputs, fast_mode=True)


def _valid_call_arguments():
    (q, k, v, theta, eta, alpha), weights, momentum = make_inputs(6, 2, torch.float32, seed=0)
    return dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, weights=weights, momentum=momentum,
                chunk_size=4)


def _replace(name, value):
    def change(arguments):
        arguments[name] = value(arguments) if callable(value) else value
    return change


BAD_INPUTS = {
    "chunk_size 0": (_replace("chunk_size", 0), "chunk_size must be an integer >= 1"),
    "chunk_size float": (_replace("chunk_size", 2.5), "chunk_size must be an integer >= 1"),
    "chunk_size bool": (_replace("chunk_size", True), "chunk_size must be an integer >= 1"),
    "retrieve": (_replace("retrieve", "layer"), "retrieve must be one of"),
    "activation": (_replace("activation", "relu"), "activation must be one of"),
    "implementation": (_replace("implementation", "cuda"), "implementation must be .auto. or one of"),
    "q rank": (_replace("q", lambda a: a["q"][0]), r"q must have shape \(B, H, T, d\)"),
    "k shape": (_replace("k", lambda a: a["k"][:, :, :3]), "k must have the shape of q"),
    "theta shape": (_replace("theta", lambda a: a["theta"][..., None]), r"theta must have shape \(B, H, T\)"),
    "no layers": (_replace("weights", ()), "at least one layer"),
    "momentum count": (_replace("momentum", lambda a: a["momentum"][:1]), "one tensor per layer"),
    "weights d_in": (_replace("weights", lambda a: (a["weights"][0][..., :3], a["weights"][1])), r"weights\[0\]"),
    "momentum shape": (_replace("momentum", lambda a: (a["momentum"][0], a["momentum"][1][:1])), r"momentum\[1\]"),
    "last d_out": (
        lambda a: (
            _replace("weights", lambda a: (a["weights"][0], a["weights"][1][:, :, :3]))(a),
            _replace("momentum", lambda a: (a["momentum"][0], a["momentum"][1][:, :, :3]))(a),
        ),
        "must map back to d",
    ),
    "integer dtype": (_replace("v", lambda a: a["v"].long()), "floating-point"),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(problem):
    change, message = BAD_INPUTS[problem]
    arguments = _valid_call_arguments()
    change(arguments)
    tensors = [arguments.pop(name) for name in (*INPUT_NAMES, "weights", "momentum")]
    with pytest.raises(ValueError, match=message):
        memory_scan(*tensors, **arguments)


@pytest.mark.parametrize("implementation", ["cpp", "fused"])
def test_inference_mode_gives_the_same_result(implementation):
    """Without autograd the chunk kernels keep no intermediates; the values must not change."""
    tensors, weights, momentum = make_inputs(13, 2, torch.float64, seed=21)
    options = dict(chunk_size=4, retrieve="token", implementation=implementation)
    y, (weights_out, momentum_out) = memory_scan(*tensors, weights, momentum, **options)
    with torch.no_grad():
        y_no_grad, (weights_no_grad, momentum_no_grad) = memory_scan(*tensors, weights, momentum, **options)
    for actual, expected in zip((y_no_grad, *weights_no_grad, *momentum_no_grad), (y, *weights_out, *momentum_out)):
        assert torch.equal(actual, expected)


def test_mixed_dtypes_keep_each_output_in_its_input_dtype():
    """bf16 activations with fp32 memory weights (autocast-style) compute in fp32."""
    tensors, weights, momentum = make_inputs(9, 2, torch.float32, seed=22)
    weights, momentum = tuple(w.float() for w in weights), tuple(s.float() for s in momentum)
    y, (weights_out, momentum_out) = memory_scan(
        *(x.bfloat16() for x in tensors), weights, momentum, chunk_size=4
    )
    assert y.dtype == torch.bfloat16
    assert all(x.dtype == torch.float32 for x in weights_out + momentum_out)
    expected, _ = memory_scan_sequential(
        *(x.bfloat16().double() for x in tensors), tuple(w.double() for w in weights),
        tuple(s.double() for s in momentum), chunk_size=4,
    )
    assert relative_error(y, expected) <= BF16_TOLERANCE


@pytest.mark.parametrize("implementation", ["cpp", "fused"])
def test_chunk_kernel_intermediates_go_through_saved_tensor_hooks(implementation):
    """Activation checkpointing can only drop what passes through saved-tensor hooks: a tensor
    kept as an attribute of the autograd context would stay alive in a checkpointed layer."""
    tensors, weights, momentum = make_inputs(16, 2, torch.float64, seed=5)
    tensors = [x.requires_grad_() for x in tensors]
    y, _ = memory_scan(*tensors, weights, momentum, chunk_size=4, retrieve="token", implementation=implementation)
    # The graph from y back to the inputs; the chunk Function's node is its ctx.
    scan_nodes = [node for node in graph_nodes(y) if type(node).__name__ == SCAN_NODES[implementation]]
    assert len(scan_nodes) == 1
    (node,) = scan_nodes
    held = [leaf for value in vars(node).values() for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    assert not held, f"{len(held)} tensors kept on the context outside save_for_backward"
    assert len(node.saved_tensors) > 4  # the gates and every chunk's intermediates


@pytest.mark.parametrize("implementation", ["cpp", "fused"])
def test_checkpointed_chunk_kernel_gives_the_same_gradients(implementation):
    tensors, weights, momentum = make_inputs(13, 2, torch.float64, seed=8)
    options = dict(chunk_size=4, retrieve="token", implementation=implementation)
    plain = run_with_grads(memory_scan, tensors, weights, momentum, upstream_seed=3, **options)

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(memory_scan, *args, use_reentrant=False, **kwargs)

    recomputed = run_with_grads(checkpointed, tensors, weights, momentum, upstream_seed=3, **options)
    for name, value in plain.items():
        assert torch.equal(recomputed[name], value), name


def test_autocast_keeps_the_state_recurrence_in_fp32():
    """Under bf16 autocast the scan computes as without it: bf16 rounding happens only at its inputs."""
    tensors, weights, momentum = make_inputs(33, 2, torch.float32, 0)
    tensors = tuple(x.bfloat16() for x in tensors)
    weights, momentum = (tuple(x.float() for x in group) for group in (weights, momentum))
    plain = memory_scan(*tensors, weights, momentum, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = memory_scan(*tensors, weights, momentum, chunk_size=5)
    for got, want in zip(tree_leaves(autocast), tree_leaves(plain)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_equals_fused_when_the_groups_split_unevenly(dtype, monkeypatch):
    """The C++ chunk loop on 2 threads with G = B * H = 5 groups (one worker gets 3, the other 2) gives
    fused's outputs and gradients bit for bit: the same ops per group, whatever the split. Both
    hidden-layer layouts (output side narrower and wider) and a ragged last chunk are in the case.
    fused runs with the C++ gate products here (which equal stacked_gates' to rounding only:
    tests/test_memory_scan_gates.py), so the chunk loops are compared alone."""
    from titans_train.kernels.memory_scan import fused as fused_module
    from titans_train.kernels.memory_scan.cpu import cpp_stacked_gates

    tensors, weights, momentum = make_inputs(23, 3, dtype, seed=31, batch=1, heads=5, dim=8)
    options = dict(chunk_size=6, retrieve="token", activation="gelu", residual=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpp = run_with_grads(memory_scan, tensors, weights, momentum, 9, implementation="cpp", **options)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(fused_module, "stacked_gates", cpp_stacked_gates)
    fused = run_with_grads(memory_scan, tensors, weights, momentum, 9, implementation="fused", **options)
    for name, value in fused.items():
        assert torch.equal(cpp[name], value), f"{name}: max difference {(cpp[name] - value).abs().max().item():.3g}"


def test_auto_falls_back_to_fused_with_one_warning_when_the_extension_cannot_load(monkeypatch):
    """A machine without a compiler: `auto` warns once (naming the fix) and runs fused; `cpp` raises."""
    import importlib

    from titans_train.kernels.memory_scan.cpu import ExtensionBuildError

    build_module = importlib.import_module("titans_train.kernels.memory_scan.cpu.build")
    cpp_module = importlib.import_module("titans_train.kernels.memory_scan.cpu.scan")

    def no_compiler():
        raise ExtensionBuildError("cannot build the memory_scan C++ extension (g++: not found); apt-get install g++")

    monkeypatch.setattr(build_module, "extension", no_compiler)
    monkeypatch.setattr(cpp_module, "extension", no_compiler)
    build_module.extension_loads.cache_clear()
    try:
        tensors, weights, momentum = make_inputs(9, 2, torch.float64, seed=3)
        tensors = [x.requires_grad_() for x in tensors]
        with pytest.warns(UserWarning, match="apt-get install g\\+\\+.*run their PyTorch forms instead") as caught:
            y, _ = memory_scan(*tensors, weights, momentum, chunk_size=4)
            memory_scan(*tensors, weights, momentum, chunk_size=4)
        assert len([w for w in caught if "C++ extension" in str(w.message)]) == 1
        assert SCAN_NODES["fused"] in {type(node).__name__ for node in graph_nodes(y)}
        with pytest.raises(ExtensionBuildError, match="apt-get install g"):
            memory_scan(*tensors, weights, momentum, chunk_size=4, implementation="cpp")
    finally:
        build_module.extension_loads.cache_clear()  # the real extension for the tests that follow
