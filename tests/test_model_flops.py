"""flops_per_token against the built model, and the weight-decay split."""

from __future__ import annotations

import pytest
from torch import nn

from titans_train.model import VARIANTS, TitansConfig, TitansLM, no_weight_decay
from titans_train.model.flops import flops_per_token, linear_parameter_count, mean_visible_keys

TINY = dict(vocab_size=37, dim=16, n_layers=2, n_heads=2, n_memory_heads=4, chunk_size=3,
            segment_len=6, window=5, memory_depth=3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tied", [True, False])
def test_linear_parameter_count_matches_built_model(variant, tied):
    config = TitansConfig(variant=variant, tie_embeddings=tied, **TINY)
    model = TitansLM(config)
    built = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    assert linear_parameter_count(config) == built


def test_visible_keys_by_hand():
    config = TitansConfig(variant="swa", **TINY)  # window 5, no persistent tokens
    assert mean_visible_keys(config, 7) == (1 + 2 + 3 + 4 + 5 + 5 + 5) / 7
    mac = TitansConfig(variant="mac", n_persistent=2, **TINY)  # segment 6, h and x tokens
    assert mean_visible_keys(mac, 8) == 2 * (1 + 2 + 3 + 4 + 5 + 6 + 1 + 2) / 8 + 2
    full = TitansConfig(variant="transformer", **TINY)
    assert mean_visible_keys(full, 4) == (1 + 2 + 3 + 4) / 4


def test_flops_transformer_is_six_n_plus_attention():
    config = TitansConfig(variant="transformer", **TINY)
    attention = 3 * 4 * config.dim * mean_visible_keys(config, 64) * config.n_layers
    assert flops_per_token(config, 64) == 6 * linear_parameter_count(config) + attention


def test_memory_flops_grow_with_chunk_size_only_for_token_retrieval():
    token = [flops_per_token(TitansConfig(variant="lmm", **{**TINY, "chunk_size": b}), 64) for b in (3, 6)]
    chunk = [flops_per_token(TitansConfig(variant="lmm", retrieve="chunk", **{**TINY, "chunk_size": b}), 64)
             for b in (3, 6)]
    assert token[1] > token[0] > chunk[0] == chunk[1] > 6 * linear_parameter_count(TitansConfig(variant="lmm", **TINY))


def test_no_weight_decay_split():
    model = TitansLM(TitansConfig(variant="mag", **TINY))
    decayed = {name for name, param in model.named_parameters() if not no_weight_decay(name, param)}
    exempt = {name for name, param in model.named_parameters() if no_weight_decay(name, param)}
    assert "embedding.weight" in decayed
    assert "layers.0.mixer.attention.q_proj.weight" in decayed
    assert "layers.0.mixer.memory.initial_weights.0" in decayed
    assert "layers.0.mixer.memory.theta_proj.weight" in exempt
    assert "layers.0.mixer.memory.alpha_proj.bias" in exempt
    assert "layers.0.mixer.output.norm.weight" in exempt  # (H, d): a norm although 2-D
    assert "layers.1.mixer_norm.weight" in exempt and "final_norm.weight" in exempt
    assert all(param.dim() >= 2 for name, param in model.named_parameters() if name in decayed)
