"""The tensor-parallel plan names every parameter of every variant (no processes needed)."""

import pytest

from titans_train.model import VARIANTS, TitansConfig, TitansLM
from titans_train.parallel.tensor_parallel import MODULE_STYLES, padded_vocab_size, plan_style


@pytest.mark.parametrize("variant", VARIANTS)
def test_plan_covers_every_parameter(variant):
    model = TitansLM(TitansConfig(variant=variant, vocab_size=70, dim=32, n_layers=2, n_heads=4,
                                  chunk_size=4, segment_len=8, window=8, tie_embeddings=False))
    for path, _ in model.named_parameters():
        own, owner = plan_style(path), plan_style(path.rpartition(".")[0])
        assert own is not None or owner in MODULE_STYLES, f"{variant}: {path} is not in TP_PLAN"


def test_vocabulary_padding():
    assert padded_vocab_size(70, 4) == 72
    assert padded_vocab_size(72, 4) == 72
    assert padded_vocab_size(32000, 1) == 32000
