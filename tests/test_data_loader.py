"""TokenLoader: the global order is a function of (seed, position) alone. Every sample of an epoch
is seen exactly once for 1, 2 and 4 data-parallel ranks and 0 and 2 workers; a save/restore in the
middle of an epoch (also onto another dp size) continues the identical stream; mixtures follow
their weights deterministically; validation is fixed; sequence-parallel spans tile a sample."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from titans_train.data.dataset import PreparedDataset
from titans_train.data.loader import LoaderConfigError, LoaderStateError, TokenLoader, sequence_span
from titans_train.data.order import MIXTURE_BLOCK, MixtureSchedule, permute
from titans_train.data.prepare import prepare_dataset
from titans_train.data.synthetic import numbered_documents, write_corpus

SEQ_LEN = 15
GLOBAL_BATCH = 8


def _prepare(root, name: str, num_documents: int, first_number: int) -> str:
    documents = numbered_documents(num_documents, 6, first_number)
    write_corpus(str(root / f"{name}-corpus"), documents, "jsonl")
    out = str(root / name)
    prepare_dataset([str(root / f"{name}-corpus")], out, "byte", SEQ_LEN, shard_bytes=4096,
                    num_workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("loader")
    return _prepare(root, "a", 40, 0), _prepare(root, "b", 25, 10**6)


@pytest.fixture(scope="module")
def key_of(datasets) -> dict[tuple, int]:
    """Sample tokens -> sample index in dataset a (numbered documents: all distinct)."""
    dataset = PreparedDataset(datasets[0])
    _, tokens = dataset.read(np.arange(len(dataset)))
    lookup = {tuple(row.tolist()): index for index, row in enumerate(tokens)}
    assert len(lookup) == len(dataset)
    return lookup


def global_rows(directory, steps: int, dp: int, workers: int, micro: int = 2, state=None, **kw) -> list[list[tuple]]:
    """Rows of each global batch in global order, reassembled from every dp rank's micro-batches."""
    per_rank = []
    for rank in range(dp):
        loader = TokenLoader(directory, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                             dp_rank=rank, dp_world_size=dp, num_workers=workers, tokenizer="byte", **kw)
        if state is not None:
            loader.load_state_dict(state)
        batches = list(itertools.islice(loader, steps * loader.micro_batches_per_step))
        assert all(b.shape == (micro, SEQ_LEN + 1) and b.dtype == torch.int64 for b in batches)
        rows = [tuple(row.tolist()) for b in batches for row in b]
        per_rank.append([rows[s * GLOBAL_BATCH // dp : (s + 1) * GLOBAL_BATCH // dp] for s in range(steps)])
    return [sum((per_rank[r][s] for r in range(dp)), []) for s in range(steps)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_for_any_dp_size(datasets, key_of, workers):
    size = len(key_of)
    steps = -(-2 * size // GLOBAL_BATCH)  # two epochs and a bit: the stream rolls over
    reference = None
    for dp in (1, 2, 4):
        order = [key_of[row] for batch in global_rows(datasets[0], steps, dp, workers) for row in batch]
        assert sorted(order[:size]) == list(range(size))  # epoch 0: each sample exactly once
        assert sorted(order[size : 2 * size]) == list(range(size))  # epoch 1 as well
        assert order[:size] != order[size : 2 * size]  # reshuffled per epoch
        if reference is None:
            reference = order
        assert order == reference  # the same global stream whatever dp and workers


def test_resume_mid_epoch_gives_the_identical_stream(datasets):
    size = len(PreparedDataset(datasets[0]))
    total_steps = -(-size // GLOBAL_BATCH) + 3  # crosses the epoch boundary after the resume
    uninterrupted = global_rows(datasets[0], total_steps, dp=2, workers=0, seed=5)

    loader = TokenLoader(datasets[0], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=2,
                         dp_rank=0, dp_world_size=2, seed=5)
    stop = 3  # mid-epoch
    list(itertools.islice(loader, stop * loader.micro_batches_per_step))
    state = loader.state_dict()
    assert state["samples_consumed"] == stop * GLOBAL_BATCH and state["epoch"] == 0
    for dp, workers, micro in ((2, 0, 2), (4, 2, 1), (1, 0, 8)):
        resumed = global_rows(datasets[0], total_steps - stop, dp, workers, micro=micro, state=state, seed=5)
        assert resumed == uninterrupted[stop:], (dp, workers, micro)


def test_state_errors(datasets):
    loader = TokenLoader(datasets[0], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=2, seed=1)
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(LoaderStateError, match="after the optimizer step"):
        loader.state_dict()
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    other_seed = TokenLoader(datasets[0], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=2, seed=2)
    with pytest.raises(LoaderStateError, match="seed 1"):
        other_seed.load_state_dict(state)
    other_data = TokenLoader(datasets[1], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=2, seed=1)
    with pytest.raises(LoaderStateError, match="other data"):
        other_data.load_state_dict(state)
    with pytest.raises(LoaderConfigError, match="not divisible by the data-parallel size 3"):
        TokenLoader(datasets[0], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=1, dp_world_size=3)
    with pytest.raises(LoaderConfigError, match="micro_batch_size 3"):
        TokenLoader(datasets[0], seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=3)


def test_mixture_weights_and_determinism(datasets):
    weights = {datasets[0]: 3.0, datasets[1]: 1.0}
    schedule = MixtureSchedule([3.0, 1.0], seed=0)
    which, draws = schedule.locate(np.arange(3 * MIXTURE_BLOCK))
    assert (np.bincount(which) == [3 * 3 * MIXTURE_BLOCK // 4, 3 * MIXTURE_BLOCK // 4]).all()  # exact per block
    for k in range(2):  # each dataset's draws are consecutive: nothing skipped or repeated
        assert (np.sort(draws[which == k]) == np.arange((which == k).sum())).all()
    early = np.bincount(which[:400], minlength=2) / 400
    assert abs(early[0] - 0.75) < 0.08  # mixed throughout the block, not in runs

    def stream(seed):
        loader = TokenLoader(weights, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=4, seed=seed)
        return torch.cat(list(itertools.islice(loader, 100)))

    first, again, other_seed = stream(0), stream(0), stream(1)
    assert torch.equal(first, again) and not torch.equal(first, other_seed)
    in_a = {tuple(r.tolist()) for r in PreparedDataset(datasets[0]).read(np.arange(len(PreparedDataset(datasets[0]))))[1]}
    share_a = np.mean([tuple(row.tolist()) in in_a for row in first])
    assert abs(share_a - 0.75) < 0.06


def test_validation_stream_is_fixed(datasets):
    dataset = PreparedDataset(datasets[1])
    loader = TokenLoader(datasets[1], seq_len=SEQ_LEN, global_batch_size=4, micro_batch_size=2, shuffle=False)
    first = torch.cat(list(itertools.islice(loader, 6)))
    np.testing.assert_array_equal(first.numpy(), dataset.read(np.arange(12))[1])
    loader.rewind()
    assert torch.equal(torch.cat(list(itertools.islice(loader, 6))), first)


def test_sequence_span_tiles_the_sample():
    batch = torch.arange(2 * 17).reshape(2, 17)  # (B, T + 1), T = 16
    for world in (1, 2, 4):
        spans = [sequence_span(batch, rank, world) for rank in range(world)]
        assert torch.equal(torch.cat([inputs for inputs, _ in spans], dim=1), batch[:, :-1])
        assert torch.equal(torch.cat([targets for _, targets in spans], dim=1), batch[:, 1:])
    with pytest.raises(LoaderConfigError, match="not divisible by the sequence-parallel size 3"):
        sequence_span(batch, 0, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    for epoch in (0, 1):
        image = permute(np.arange(n), n, seed=11, epoch=epoch)
        assert sorted(image.tolist()) == list(range(n))
    if n > 7:
        assert not np.array_equal(permute(np.arange(n), n, 11, 0), permute(np.arange(n), n, 11, 1))
        assert not np.array_equal(permute(np.arange(n), n, 11, 0), np.arange(n))
