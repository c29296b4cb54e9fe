"""Bad configs, token ids and states get typed errors that name the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from titans_train.model import (ConfigError, InputIdsError, ModelState, StateMismatchError,
                                TitansConfig, TitansLM)

TINY = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, chunk_size=3, segment_len=6, window=5)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_heads=3), "n_heads"),                       # 16 not divisible by 3
    (dict(n_heads=16), "n_heads"),                      # head_dim 1 is odd: RoPE needs pairs
    (dict(n_memory_heads=5), "n_memory_heads"),
    (dict(variant="rnn"), "variant"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(window=0, variant="swa"), "window"),
    (dict(segment_len=7, variant="mac"), "segment_len"),
    (dict(retrieve="all"), "retrieve"),
    (dict(memory_activation="relu"), "memory_activation"),
    (dict(memory_depth=0), "memory_depth"),
    (dict(n_persistent=-1), "n_persistent"),
    (dict(theta_max=0.0), "theta_max"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_names_field_and_fix(overrides, field):
    with pytest.raises(ConfigError) as error:
        TitansConfig(**{**TINY, **overrides})
    assert error.value.field == field
    assert f"TitansConfig.{field}=" in str(error.value) and "Fix:" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_segment_len_is_only_checked_for_mac():
    TitansConfig(**{**TINY, "variant": "lmm", "segment_len": 7})


def test_from_dict_rejects_unknown_fields():
    assert TitansConfig.from_dict(TitansConfig(**TINY).to_dict()) == TitansConfig(**TINY)
    with pytest.raises(ConfigError, match="unknown field"):
        TitansConfig.from_dict({**TINY, "n_head": 2})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TitansLM(TitansConfig(variant="mac", **TINY))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 37]]), r"\[0, 37\) \(vocab_size\), got values in \[1, 37\]"),
    (torch.tensor([[-1, 2]]), r"got values in \[-1, 2\]"),
    (torch.tensor([[1.0, 2.0]]), "integer tensor"),
    (torch.tensor([1, 2]), r"shape \(batch, seq_len\)"),
    (torch.zeros(1, 0, dtype=torch.long), "seq_len >= 1"),
])
def test_bad_input_ids(model, ids, message):
    with pytest.raises(InputIdsError, match=message):
        model(ids)


def test_state_from_another_config_is_rejected(model):
    ids = torch.randint(0, 37, (2, 5))
    state = model(ids).state
    torch.manual_seed(0)
    for other_config, message in [
        (dict(n_layers=3), "state has 2 layers, this model has 3"),
        (dict(dim=32, n_heads=4), r"has shape .*expected"),
        (dict(variant="mag"), "state has keys"),
    ]:
        other = TitansLM(TitansConfig(**{**TINY, "variant": "mac", **other_config}))
        with pytest.raises(StateMismatchError, match=message):
            other(ids, state)
    with pytest.raises(StateMismatchError, match="for batch size 3 at position 5"):
        model(torch.randint(0, 37, (3, 2)), state)
    with pytest.raises(StateMismatchError, match="at position 4"):
        model(ids, ModelState(4, state.layers))
    with pytest.raises(StateMismatchError, match="must be a ModelState"):
        model(ids, state.layers)


def test_layer_without_state_only_at_position_zero(model):
    hidden = model.embed_tokens(torch.randint(0, 37, (1, 4)))
    with pytest.raises(StateMismatchError, match="only at position 0"):
        model.layers[0](hidden, None, 6)
