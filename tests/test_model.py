"""TitansLM, every variant: the state contract (split/continue, token-by-token decoding), causality,
gradients (every parameter, into an incoming state, through a split), and the layer-level API.

Tiny fp64 models, with chunk 3, MAC segment 6 and window 5 so that the split points below fall
inside and on the edges of memory chunks, MAC segments and attention windows.
"""

from __future__ import annotations

import pytest
import torch

from titans_train.model import VARIANTS, ModelState, TitansConfig, TitansLM
from titans_train.model.config import MEMORY_VARIANTS

VOCAB = 37
SEQ_LEN = 14
# 3 and 12: chunk-aligned (12 also segment-aligned); 6: segment-aligned; 1, 5, 7, 10: inside.
SPLITS = (1, 3, 5, 6, 7, 10, 12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny ops on a shared 2-core machine: extra threads only contend (10x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(variant: str, **overrides) -> TitansConfig:
    values = dict(variant=variant, vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, n_memory_heads=2,
                  memory_depth=2, memory_expansion=2, chunk_size=3, segment_len=6, window=5,
                  n_persistent=2, conv_kernel=3,
                  # Large inner steps make the memory's share of the logits large, so a wrong
                  # carried state shows; stable at these sizes and one forward.
                  theta_max=0.5, eta_bias_init=1.0)
    values.update(overrides)
    return TitansConfig(**values)


def tiny_model(variant: str, seed: int = 0, **overrides) -> TitansLM:
    torch.manual_seed(seed)
    return TitansLM(tiny_config(variant, **overrides)).double()


def token_ids(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_and_continue_equals_whole(variant):
    model = tiny_model(variant)
    ids = token_ids()
    with torch.no_grad():
        whole = model(ids)
        for split in SPLITS:
            first = model(ids[:, :split])
            second = model(ids[:, split:], first.state)
            assert_close(torch.cat([first.logits, second.logits], dim=1), whole.logits)
            assert second.state.position == SEQ_LEN
            for got, want in zip(second.state.layers, whole.state.layers):
                assert got.keys() == want.keys()
                for name in want:
                    assert_close(got[name], want[name])


@pytest.mark.parametrize("variant", ["lmm", "mac"])
@pytest.mark.parametrize("overrides", [dict(retrieve="chunk"), dict(memory_depth=1, memory_residual=False)])
def test_split_and_continue_other_memory_settings(variant, overrides):
    model = tiny_model(variant, **overrides)
    ids = token_ids()
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :4])
        middle = model(ids[:, 4:11], first.state)
        last = model(ids[:, 11:], middle.state)
    assert_close(torch.cat([first.logits, middle.logits, last.logits], dim=1), whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_by_token_decoding_equals_full_forward(variant):
    model = tiny_model(variant)
    ids = token_ids(seq_len=11)
    with torch.no_grad():
        whole = model(ids).logits
        state, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], state)
            steps.append(out.logits)
            state = out.state
    assert_close(torch.cat(steps, dim=1), whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = tiny_model(variant)
    ids = token_ids()
    changed = ids.clone()
    cut = 7  # inside a chunk and a segment: later tokens of the same chunk are re-drawn
    changed[:, cut + 1 :] = (ids[:, cut + 1 :] + 1 + torch.arange(SEQ_LEN - cut - 1)) % VOCAB
    with torch.no_grad():
        original, perturbed = model(ids).logits, model(changed).logits
    assert_close(perturbed[:, : cut + 1], original[:, : cut + 1])
    assert not torch.allclose(perturbed[:, cut + 1 :], original[:, cut + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    model = tiny_model(variant)
    model(token_ids()).logits.pow(2).mean().backward()
    missing = [name for name, param in model.named_parameters()
               if param.grad is None or not param.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_flows_into_incoming_state(variant):
    model = tiny_model(variant)
    ids = token_ids()
    split = 7
    with torch.no_grad():
        first = model(ids[:, :split])
    received = ModelState(first.state.position,
                          [{name: value.clone().requires_grad_() for name, value in layer.items()}
                           for layer in first.state.layers])
    model(ids[:, split:], received).logits.pow(2).mean().backward()
    for index, layer in enumerate(received.layers):
        for name, value in layer.items():
            if value.numel():
                assert value.grad is not None and value.grad.abs().sum() > 0, (index, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_through_a_split_equal_whole_sequence_gradients(variant):
    model = tiny_model(variant)
    ids = token_ids()
    model(ids).logits.pow(2).sum().backward()
    whole = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    first = model(ids[:, :5])
    second = model(ids[:, 5:], first.state)
    (first.logits.pow(2).sum() + second.logits.pow(2).sum()).backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, whole[name])


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_state_matches_real_state_shapes(variant):
    model = tiny_model(variant)
    ids = token_ids()
    with torch.no_grad():
        for position in (0, 3, 5, 6, 12):
            empty = model.empty_state(2, position, dtype=torch.float64)
            assert empty.position == position
            if position == 0:
                real = [layer.initial_state(2, dtype=torch.float64) for layer in model.layers]
            else:
                real = model(ids[:, :position]).state.layers
            for got, want in zip(empty.layers, real):
                assert {n: v.shape for n, v in got.items()} == {n: v.shape for n, v in want.items()}
                assert all(v.dtype == torch.float64 for v in got.values())


@pytest.mark.parametrize("variant", ["mac", "swa"])
def test_layer_level_api_reproduces_forward(variant):
    model = tiny_model(variant)
    ids = token_ids()
    with torch.no_grad():
        first = model(ids[:, :5])
        expected = model(ids[:, 5:], first.state).logits
        hidden = model.embed_tokens(ids[:, 5:])
        for layer, layer_state in zip(model.layers, first.state.layers):
            hidden, _ = layer(hidden, layer_state, 5)
        assert_close(model.final_logits(hidden), expected)


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_telemetry_reports_memory_gates(variant):
    model = tiny_model(variant)
    out = model(token_ids(), return_telemetry=True)
    for index in range(2):
        for name in ("theta", "eta", "alpha", "update_norm"):
            value = out.telemetry[f"layers.{index}.memory.{name}"]
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
    assert 0 < out.telemetry["layers.0.memory.theta"] < model.config.theta_max
    assert out.telemetry["layers.0.memory.update_norm"] > 0
    assert model(token_ids()).telemetry is None


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
@pytest.mark.parametrize("switch, gate", [("memory_momentum", "eta_proj"), ("memory_decay", "alpha_proj")])
def test_update_ablation_removes_exactly_its_term(variant, switch, gate):
    """memory_momentum/memory_decay False equals the paper's update with that gate driven to exactly 0
    through its own sigmoid (bias -inf), and differs from the update with the term."""
    settings = dict(alpha_bias_init=0.0)  # forgetting 0.5 per token: the term is large enough to show
    ablated = tiny_model(variant, **settings, **{switch: False})
    reference, full = tiny_model(variant, **settings), tiny_model(variant, **settings)
    gates = [module for name, module in reference.named_modules() if name.endswith(f"memory.{gate}")]
    assert len(gates) == reference.config.n_layers
    for module in gates:
        module.bias.data.fill_(float("-inf"))
    ids = token_ids()
    with torch.no_grad():
        logits = ablated(ids).logits
        assert_close(logits, reference(ids).logits)
        assert not torch.allclose(logits, full(ids).logits)
