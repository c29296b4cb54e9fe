"""The memory's store telemetry (`store_gain`, `store_gain_shuffled`, memory.py `_store_gains`):
present for every memory layer and variant, exactly 0 for a memory that cannot write, positive
and above its shuffled control for a memory that writes repeated pairs hard, and equal to the
loss ratio computed by hand from memory_mlp on the same pairs and weights (open block re-run
included)."""

from __future__ import annotations

import pytest
import torch

from titans_train.kernels import memory_mlp
from titans_train.model.config import MEMORY_VARIANTS

from test_model import one_thread, tiny_model, token_ids  # noqa: F401  (one_thread: autouse fixture)

GAINS = ("store_gain", "store_gain_shuffled")


def _memory(**overrides):
    """Layer 0's NeuralMemory of a tiny fp64 LMM (chunk 3: its block)."""
    model = tiny_model("lmm", **overrides)
    return model.layers[0].mixer.memory


def _association_loss(memory, weights, keys, values) -> torch.Tensor:
    """1/2 sum_i ||M_W(k_i) - v_i||^2 per sample and head -> (B, Hm)."""
    return 0.5 * (memory_mlp(weights, keys, memory.activation, memory.residual) - values).pow(2).sum(dim=(-2, -1))


def _weights(memory, state) -> tuple[torch.Tensor, ...]:
    return tuple(state[f"weights.{layer}"] for layer in range(len(memory.initial_weights)))


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_store_gains_for_every_memory_layer(variant):
    telemetry = tiny_model(variant)(token_ids(), return_telemetry=True).telemetry
    for layer in range(2):
        for name in GAINS:
            value = telemetry[f"layers.{layer}.memory.{name}"]
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), (layer, name)


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_a_memory_that_cannot_write_stores_nothing(variant):
    """theta driven to exactly 0 through its sigmoid (bias -inf) and no forgetting: the weights
    do not move, so both gains are exactly 0."""
    model = tiny_model(variant, memory_decay=False)
    for name, module in model.named_modules():
        if name.endswith("memory.theta_proj"):
            module.bias.data.fill_(float("-inf"))
    telemetry = model(token_ids(), return_telemetry=True).telemetry
    for layer in range(2):
        assert telemetry[f"layers.{layer}.memory.update_norm"] == 0
        for name in GAINS:
            assert telemetry[f"layers.{layer}.memory.{name}"] == 0, (layer, name)


def test_store_gain_equals_the_loss_ratio_by_hand():
    """Two calls with block 3: the first leaves one token open, the second re-runs it and closes
    two blocks (6 pairs). The pairs are the second call's keys/values as a call that closes
    nothing (block 100) holds them open; the weights are its incoming and outgoing state."""
    memory = _memory()
    x = torch.randn(2, 11, memory.q_proj.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    block = memory.chunk_size
    with torch.no_grad():
        _, first = memory(x[:, :4], memory.initial_state(2, x.device, x.dtype), block)
        stats = {}
        _, second = memory(x[:, 4:], first, block, stats)
        _, held_open = memory(x[:, 4:], first, 100)
    assert first["open_keys"].shape[2] == 1 and second["open_keys"].shape[2] == 2
    keys, values = held_open["open_keys"][:, :, :6], held_open["open_values"][:, :, :6]  # (B, Hm, 6, d)
    before, after = _weights(memory, first), _weights(memory, second)
    for name, targets in (("store_gain", values), ("store_gain_shuffled", values.roll(3, dims=2))):
        expected = (1 - _association_loss(memory, after, keys, targets)
                    / _association_loss(memory, before, keys, targets)).mean()
        assert abs(stats[0][name].item() - expected.item()) < 1e-6, name


def test_a_memory_writing_repeated_pairs_stores_them():
    """A strong inner learning rate (theta = theta_max = 0.1, momentum 0.73) on a period-5
    sequence of inputs, 24 tokens (8 blocks), values scaled up to O(1) and distinct (at init they
    are ~0.01, so the loss is the residual's and both gains would be the drift to the mean): the
    loss of the stored pairs falls, and falls more than that of the same keys with the values
    rolled by 12 (not a multiple of the period). Measured: 0.77 and -0.06."""
    memory = _memory(theta_max=0.1)
    memory.theta_proj.bias.data.fill_(float("inf"))
    memory.v_proj.weight.data.mul_(30.0)
    pattern = torch.randn(2, 5, memory.q_proj.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = pattern.repeat(1, 5, 1)[:, :24]  # (B, 24, D)
    stats = {}
    with torch.no_grad():
        memory(x, memory.initial_state(2, x.device, x.dtype), memory.chunk_size, stats)
    gain, shuffled = stats[0]["store_gain"].item(), stats[0]["store_gain_shuffled"].item()
    assert gain > 0.5 and gain > shuffled + 0.5, (gain, shuffled)
