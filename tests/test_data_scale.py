"""The loader at trillion-token scale, from synthetic manifests (no shard data written; the file
layer is replaced by a stub whose rows carry their sample index): a 10^5-shard manifest of 10^12
tokens opens without mapping a shard, the sample order is a bijection (sampled) at that size,
positions past 2^53 survive state round trips exactly (no float on the way), a resume continues
the exact stream on another dp size, and the work per step is the same at step 0 and 10^9."""

from __future__ import annotations

import io
import itertools
import json
import os
import time

import numpy as np
import pytest
import torch

from titans_train.data import dataset as dataset_module
from titans_train.data import order as order_module
from titans_train.data.dataset import PreparedDataset
from titans_train.data.loader import LoaderStateError, TokenLoader
from titans_train.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from titans_train.data.order import derive_seed, permute
from titans_train.data.shards import digests_name
from titans_train.data.synthetic import synthetic_manifest as write_synthetic_manifest

TOKENS = 10**12
SEQ_LEN = 2047  # samples of 2048 tokens: 488,281,250 samples
SHARDS = 10**5
GLOBAL_BATCH = 256
MICRO_BATCH = 64


def synthetic_manifest(directory: str, tokens: int, shards: int, seed: int = 0) -> Manifest:
    return write_synthetic_manifest(directory, tokens, shards, SEQ_LEN, seed)


@pytest.fixture(scope="module")
def trillion(tmp_path_factory) -> tuple[str, str]:
    """(10^12 tokens in 1000 shards, 10^11 tokens in 100 shards for mixtures). The loader above the
    shard index does not depend on the shard count; 10^5 shards are opened in their own test."""
    root = tmp_path_factory.mktemp("scale")
    synthetic_manifest(str(root / "a"), TOKENS, 1000)
    synthetic_manifest(str(root / "b"), TOKENS // 10, 100, seed=1)
    return str(root / "a"), str(root / "b")


class StubFiles:
    """The shard files, faked: the directory lists the manifest's names, and reading sample i
    gives a row whose first column is i (the loader's logic above the files is what is tested)."""

    def __init__(self, monkeypatch) -> None:
        self.rows_read = 0
        self.listings: dict[str, list[str]] = {}
        real_listdir = os.listdir

        def listdir(directory):
            if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
                return real_listdir(directory)
            if directory not in self.listings:
                self.add(directory, read_manifest(directory))
            return self.listings[directory]

        def read(dataset, indices):
            indices = np.asarray(indices, dtype=np.int64)
            dataset.locate(indices)  # the real index arithmetic runs
            self.rows_read += len(indices)
            tokens = np.zeros((len(indices), dataset.seq_len + 1), dtype=np.int64)
            tokens[:, 0] = indices
            return indices.copy(), tokens

        monkeypatch.setattr(dataset_module.os, "listdir", listdir)
        monkeypatch.setattr(PreparedDataset, "read", read)

    def add(self, directory: str, manifest: Manifest) -> None:
        shards = [shard["file"] for shard in manifest.shards]
        self.listings[os.path.abspath(directory)] = [MANIFEST_NAME] + shards + [digests_name(name) for name in shards]


def loader(datasets, dp_rank: int = 0, dp: int = 1, micro: int = MICRO_BATCH, seed: int = 3) -> TokenLoader:
    return TokenLoader(datasets, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                       dp_rank=dp_rank, dp_world_size=dp, seed=seed, tokenizer="byte")


def global_samples(datasets, state: dict | None, steps: int, dp: int = 1, micro: int = MICRO_BATCH) -> list[int]:
    """The sample indices of `steps` global batches in global order (every dp rank's rows)."""
    per_rank = []
    for rank in range(dp):
        rank_loader = loader(datasets, rank, dp, micro)
        if state is not None:
            rank_loader.load_state_dict(state)
        batches = list(itertools.islice(rank_loader, steps * rank_loader.micro_batches_per_step))
        rows = torch.cat(batches)[:, 0].tolist()
        span = GLOBAL_BATCH // dp
        per_rank.append([rows[s * span : (s + 1) * span] for s in range(steps)])
    return [index for step in range(steps) for rank in range(dp) for index in per_rank[rank][step]]


def test_a_manifest_of_100k_shards_and_10e12_tokens_opens_without_mapping_a_shard(tmp_path, monkeypatch):
    manifest = synthetic_manifest(str(tmp_path), TOKENS, SHARDS)
    StubFiles(monkeypatch).add(str(tmp_path), manifest)  # the fake listing is made before the clock starts
    started = time.perf_counter()
    dataset = PreparedDataset(str(tmp_path), "byte", SEQ_LEN)
    seconds = time.perf_counter() - started
    print(f"\n10^5-shard manifest: read, checked and indexed in {seconds:.2f} s")  # recorded, not asserted
    manifest = dataset.manifest
    assert dataset.num_shards == SHARDS and dataset.open_shards == 0
    assert len(dataset) == TOKENS // (SEQ_LEN + 1) and manifest.num_tokens == len(dataset) * (SEQ_LEN + 1)
    assert dataset._shard_starts.dtype == np.int64
    # The last sample of the last shard: index arithmetic past 2^28 (token offsets past 2^39) stays exact.
    shard_ids, members = dataset.locate([len(dataset) - 1, 2**28 + 7])
    assert shard_ids[0] == SHARDS - 1 and members[0] == manifest.shards[-1]["samples"] - 1
    starts = np.cumsum([0] + [s["samples"] for s in manifest.shards])
    assert starts[shard_ids[1]] + members[1] == 2**28 + 7


@pytest.mark.parametrize("n", [TOKENS // (SEQ_LEN + 1), 10**12, 2**38 + 1])
def test_the_order_is_a_bijection_at_trillion_scale_sampled(n):
    """Distinct positions map to distinct samples in range (a sampled check of injectivity on a
    finite set, so of bijectivity), for every epoch and at the worst cycle-walking size (4^k + 1)."""
    rng = np.random.default_rng(n % 1000)
    positions = np.unique(np.concatenate([rng.integers(0, n, 50_000, dtype=np.int64),
                                          np.arange(1000, dtype=np.int64), n - 1 - np.arange(1000, dtype=np.int64)]))
    for epoch in (0, 1, 10**6):
        image = permute(positions, n, seed=7, epoch=epoch)
        assert image.dtype == np.int64 and image.min() >= 0 and image.max() < n
        assert len(np.unique(image)) == len(positions)
    assert not np.array_equal(permute(positions, n, 7, 0), permute(positions, n, 7, 1))
    # Consecutive positions are scattered over the whole range (shuffled, not a shifted block).
    window = permute(np.arange(10_000, dtype=np.int64), n, 7, 0)
    assert window.min() < n // 100 and window.max() > n - n // 100


def test_positions_past_2_53_resume_exactly_through_checkpoint_formats(trillion, monkeypatch):
    StubFiles(monkeypatch)
    n = TOKENS // (SEQ_LEN + 1)
    start = 2**53 + 1  # a float64 cannot hold it: any float on the way would move the stream
    probe = loader(trillion[0])
    state = {"samples_consumed": start, "seed": 3, "epoch": start // n, "fingerprint": probe.stream.fingerprint}
    probe.load_state_dict(state)
    rows = global_samples(trillion[0], state, steps=2)
    positions = range(start, start + 2 * GLOBAL_BATCH)
    expected = [int(permute(np.array([p % n]), n, derive_seed(3, 0), p // n)[0]) for p in positions]
    assert rows == expected  # the plain reference: Python ints all the way

    list(itertools.islice(probe, 3 * probe.micro_batches_per_step))
    saved = probe.state_dict()
    assert saved["samples_consumed"] == start + 3 * GLOBAL_BATCH and type(saved["samples_consumed"]) is int
    buffer = io.BytesIO()
    torch.save({"data": saved}, buffer)
    through_torch = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["data"]
    through_json = json.loads(json.dumps(saved))
    assert through_torch == saved and through_json == saved
    for copy in (through_torch, through_json):
        resumed = loader(trillion[0])
        resumed.load_state_dict(copy)
        assert resumed.state_dict() == saved
    with pytest.raises(LoaderStateError, match="not a non-negative integer"):
        loader(trillion[0]).load_state_dict({**saved, "samples_consumed": float(saved["samples_consumed"])})


def test_resume_at_step_1e9_continues_the_exact_stream_on_another_dp_size(trillion, monkeypatch):
    StubFiles(monkeypatch)
    mixture = {trillion[0]: 3.0, trillion[1]: 1.0}
    for datasets in (trillion[0], mixture):
        probe = loader(datasets)
        position = 10**9 * GLOBAL_BATCH
        state = {"samples_consumed": position, "seed": 3, "epoch": probe.stream.epoch(position),
                 "fingerprint": probe.stream.fingerprint}
        uninterrupted = global_samples(datasets, state, steps=5)
        probe.load_state_dict(state)
        list(itertools.islice(probe, 2 * probe.micro_batches_per_step))
        midway = probe.state_dict()
        assert midway["samples_consumed"] == position + 2 * GLOBAL_BATCH
        for dp, micro in ((2, 32), (4, 64)):
            assert global_samples(datasets, midway, steps=3, dp=dp, micro=micro) == uninterrupted[2 * GLOBAL_BATCH:]


def test_work_per_step_is_the_same_at_step_0_and_step_1e9(trillion, monkeypatch):
    """Counted, not timed: Feistel evaluations (elements through the network, cycle walks included),
    mixture blocks built and rows read per optimizer step, near step 0 and near step 10^9."""
    stub = StubFiles(monkeypatch)
    work = {"feistel": 0, "blocks": 0}
    feistel, block = order_module._feistel, order_module.MixtureSchedule._block

    def counted_feistel(values, half_bits, round_keys):
        work["feistel"] += len(values)
        return feistel(values, half_bits, round_keys)

    def counted_block(schedule, index):
        if schedule._cached_block is None or schedule._cached_block[0] != index:
            work["blocks"] += 1
        return block(schedule, index)

    monkeypatch.setattr(order_module, "_feistel", counted_feistel)
    monkeypatch.setattr(order_module.MixtureSchedule, "_block", counted_block)
    mixture = {trillion[0]: 3.0, trillion[1]: 1.0}
    for datasets in (trillion[0], mixture):
        per_step = {}
        for step in (0, 10**9):
            steady = loader(datasets)
            position = step * GLOBAL_BATCH
            steady.load_state_dict({"samples_consumed": position, "seed": 3, "epoch": steady.stream.epoch(position),
                                    "fingerprint": steady.stream.fingerprint})
            iterator = iter(steady)
            counts = []
            for _ in range(16):
                before = (work["feistel"], work["blocks"], stub.rows_read)
                for _ in range(steady.micro_batches_per_step):
                    next(iterator)
                counts.append((work["feistel"] - before[0], work["blocks"] - before[1], stub.rows_read - before[2]))
            per_step[step] = np.array(counts)
        for step, counts in per_step.items():
            feistel_elements, blocks, rows = counts.T
            assert (rows == GLOBAL_BATCH).all()
            assert (blocks <= 2).all()  # a mixture builds at most one new block of 4096 slots per step
            # O(batch): a mixture block costs MIXTURE_BLOCK elements, the samples their cycle walks.
            assert feistel_elements.max() <= 2 * order_module.MIXTURE_BLOCK * 8 + 16 * GLOBAL_BATCH, step
        early, late = per_step[0][:, 0].mean(), per_step[10**9][:, 0].mean()
        assert 0.5 < late / early < 2.0, (early, late)  # flat: no dependence on the position
