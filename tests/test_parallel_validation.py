"""Invalid parallel layouts are refused before any process-group work, with the key and the fix."""

import pytest

from titans_train.model import TitansConfig
from titans_train.parallel.layout import ParallelConfigError
from titans_train.parallel.validation import (
    validate_parallel_layout,
    validate_sequence_parallel,
    validate_tensor_parallel,
)


def config(**overrides):
    values = dict(variant="mac", vocab_size=64, dim=48, n_layers=2, n_heads=6, chunk_size=4,
                  segment_len=8, window=8)
    values.update(overrides)
    return TitansConfig(**values)


def test_valid_layout_returns_the_grid():
    layout = validate_parallel_layout(config(), tp=2, sp=2, world_size=8, seq_len=32)
    assert (layout.tp, layout.sp, layout.dp) == (2, 2, 2)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError) as info:
        validate_tensor_parallel(config(), 4)
    message = str(info.value)
    assert info.value.key == "parallel.tp"
    assert "model.n_heads = 6" in message and "parallel.tp = 4" in message
    assert "[2, 3, 6]" in message  # the tp values that would work


def test_memory_heads_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError, match=r"model.n_memory_heads = 3 is not divisible by parallel.tp = 2"):
        validate_tensor_parallel(config(n_heads=6, n_memory_heads=3), 2)


def test_memory_heads_ignored_without_memory():
    validate_tensor_parallel(config(variant="transformer", n_memory_heads=3), 2)


def test_sequence_not_divisible_into_spans():
    with pytest.raises(ParallelConfigError, match=r"sequence length 30 does not split into parallel.sp = 4"):
        validate_sequence_parallel(config(), 4, 30)


def test_span_not_multiple_of_chunk():
    with pytest.raises(ParallelConfigError) as info:
        validate_sequence_parallel(config(variant="lmm", chunk_size=8), 4, 48)
    message = str(info.value)
    assert "48 / 4 = 12 is not a multiple of model.chunk_size = 8" in message
    assert "parallel.sp in [1, 2, 3, 6]" in message


def test_span_not_multiple_of_mac_segment():
    with pytest.raises(ParallelConfigError, match=r"model.segment_len = 16"):
        validate_sequence_parallel(config(segment_len=16), 4, 32)  # span 8: whole chunks, half a segment


def test_attention_baselines_need_whole_spans_only():
    validate_sequence_parallel(config(variant="swa", chunk_size=64), 4, 12)


def test_world_not_divisible_is_reported_first():
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by parallel.tp x parallel.sp = 2 x 2 = 4"):
        validate_parallel_layout(config(), tp=2, sp=2, world_size=6, seq_len=32)
