"""Shard content checks while training (data.verify): a flipped byte in a shard member, a token id
outside the vocabulary and a damaged digest file are each one ShardError naming the shard file, the
member and the fix, at the read that meets them; "sampled" checks one member read in 8 and "none"
only the layout. The open shards stay within a bounded LRU and give the same samples as unbounded."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import zlib

import numpy as np
import pytest

from titans_train.data.dataset import PreparedDataset
from titans_train.data.errors import ManifestError, ShardError
from titans_train.data.loader import TokenLoader
from titans_train.data.manifest import Manifest, write_manifest
from titans_train.data.prepare import prepare_dataset
from titans_train.data.shards import SAMPLED_EVERY, TAR_BLOCK, SampleLayout, digests_name
from titans_train.data.synthetic import synthetic_documents, write_corpus

SEQ_LEN = 31
LAYOUT = SampleLayout(SEQ_LEN, "uint16")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("verify")
    write_corpus(str(root / "corpus"), synthetic_documents(60, 40, seed=3), "jsonl")
    prepare_dataset([str(root / "corpus")], str(root / "out"), "byte", SEQ_LEN, shard_bytes=20_000,
                    num_workers=1, progress=False)
    return str(root / "out")


@pytest.fixture()
def prepared(pristine, tmp_path) -> str:
    copy = str(tmp_path / "data")
    shutil.copytree(pristine, copy)
    return copy


def member_offset(member: int) -> int:
    return member * LAYOUT.member_bytes


def flip_token_byte(directory: str, shard: str, member: int) -> None:
    """Flip one byte among member `member`'s token ids; the file keeps its size."""
    path = os.path.join(directory, shard)
    data = bytearray(open(path, "rb").read())
    data[member_offset(member) + TAR_BLOCK + LAYOUT.npy_header_bytes + 6] ^= 0x01
    open(path, "wb").write(bytes(data))


def global_index(dataset: PreparedDataset, shard_id: int, member: int) -> int:
    shard_ids, members = dataset.locate(np.arange(len(dataset)))
    return int(np.flatnonzero((shard_ids == shard_id) & (members == member))[0])


def epoch_of_batches(directory: str, verify: str, workers: int = 0) -> list:
    loader = TokenLoader(directory, seq_len=SEQ_LEN, global_batch_size=4, micro_batch_size=2, tokenizer="byte",
                         verify=verify, num_workers=workers)
    return list(itertools.islice(loader, len(loader.stream.datasets[0]) // 2 + 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_token_byte_is_caught_while_training_with_the_file_and_member_named(prepared, workers):
    flip_token_byte(prepared, "shard-000001.tar", member=3)
    with pytest.raises(ShardError) as caught:
        epoch_of_batches(prepared, "full", workers)  # one epoch reads every member once
    message = str(caught.value)
    assert "\n" not in message  # also from a loader worker process: the error itself, not a traceback
    assert f"{prepared}/shard-000001.tar: member 3 " in message and "does not match its digest" in message
    assert "titans-train data verify" in message and "prepare the dataset" in message
    assert len(epoch_of_batches(prepared, "none", workers)) > 0  # "none": the layout only, trains silently


def test_sampled_checks_one_member_read_in_eight(prepared):
    flip_token_byte(prepared, "shard-000000.tar", member=0)
    dataset = PreparedDataset(prepared, verify="sampled")
    bad, clean = global_index(dataset, 0, 0), global_index(dataset, 0, 1)
    with pytest.raises(ShardError, match=r"shard-000000\.tar: member 0 .*does not match its digest"):
        dataset.read([bad])  # the shard's first read is checked
    dataset = PreparedDataset(prepared, verify="sampled")
    dataset.read([clean, bad] + [clean] * (SAMPLED_EVERY - 2))  # reads 1 (checked) to 8: the bad one unchecked
    with pytest.raises(ShardError, match=r"member 0 .*does not match its digest"):
        dataset.read([bad])  # read 9 is checked


def test_token_id_outside_the_vocabulary_is_named_with_its_shard(prepared):
    """A shard whose digests agree with its bytes but whose ids do not fit the tokenizer (written
    by another tool, or prepared with another vocabulary) fails at the read, not in the model."""
    shard = "shard-000002.tar"
    path = os.path.join(prepared, shard)
    data = bytearray(open(path, "rb").read())
    start = member_offset(5) + TAR_BLOCK + LAYOUT.npy_header_bytes
    data[start : start + 2] = np.uint16(300).tobytes()  # byte vocabulary: 257 ids
    open(path, "wb").write(bytes(data))
    digests = np.fromfile(os.path.join(prepared, digests_name(shard)), dtype="<u4")
    digests[5] = zlib.crc32(bytes(data[member_offset(5) : member_offset(6)]))
    digests.tofile(os.path.join(prepared, digests_name(shard)))
    content = json.load(open(os.path.join(prepared, "manifest.json")))
    for entry in content["shards"]:
        if entry["file"] == shard:
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            entry["digests_sha256"] = hashlib.sha256(digests.tobytes()).hexdigest()
    content.pop("fingerprint")
    write_manifest(prepared, Manifest(**content).finalize())

    dataset = PreparedDataset(prepared, verify="full")
    with pytest.raises(ShardError, match=rf"{shard}: member 5 .* token id 300, outside the tokenizer's vocabulary "
                                         r"of 257.*data verify"):
        dataset.read([global_index(dataset, 2, 5)])
    PreparedDataset(prepared, verify="none").verify_all()  # consistent files: only the id check sees it


def test_damaged_or_missing_digest_file(prepared):
    sidecar = os.path.join(prepared, digests_name("shard-000001.tar"))
    data = bytearray(open(sidecar, "rb").read())
    data[0] ^= 0xFF
    open(sidecar, "wb").write(bytes(data))
    dataset = PreparedDataset(prepared)
    with pytest.raises(ShardError, match=r"digest file .*shard-000001\.crc32 does not match its sha256"):
        dataset.read([global_index(dataset, 1, 0)])
    with pytest.raises(ShardError, match=r"shard-000001\.crc32 does not match"):
        PreparedDataset(prepared, verify="none").verify_all()
    os.remove(sidecar)
    with pytest.raises(ShardError, match=r"shard-000001\.crc32 .*is missing"):
        PreparedDataset(prepared)
    PreparedDataset(prepared, verify="none").read([0])  # "none" does not need digests


def test_dataset_without_digests_asks_for_prepare_or_verify_none(prepared):
    """A dataset prepared before member digests existed (manifest entries without them)."""
    content = json.load(open(os.path.join(prepared, "manifest.json")))
    for entry in content["shards"]:
        del entry["digests_sha256"]
    content.pop("fingerprint")
    write_manifest(prepared, Manifest(**content).finalize())
    with pytest.raises(ManifestError, match=r"without member digests.*prepare the dataset .* data\.verify=none"):
        PreparedDataset(prepared)
    dataset = PreparedDataset(prepared, verify="none")
    assert len(dataset.read(np.arange(len(dataset)))[1]) == len(dataset)


def test_open_shards_stay_within_the_lru_bound(pristine):
    bounded = PreparedDataset(pristine, max_open_shards=2)
    unbounded = PreparedDataset(pristine, max_open_shards=10**6)
    assert bounded.num_shards >= 4 and bounded.open_shards == 0  # nothing mapped up front
    order = np.random.default_rng(0).permutation(len(bounded))
    for chunk in np.array_split(order, 7):
        keys, tokens = bounded.read(chunk)
        assert bounded.open_shards <= 2
        expected_keys, expected_tokens = unbounded.read(chunk)
        np.testing.assert_array_equal(keys, expected_keys)
        np.testing.assert_array_equal(tokens, expected_tokens)
    assert unbounded.open_shards == unbounded.num_shards
