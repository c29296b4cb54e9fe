"""`PreparedDataset`: random access to the samples of one prepared directory, by global index.

Sample indices run over the shards in manifest order. Opening reads the manifest, checks the run's
tokenizer / seq_len and that every shard file is present (one directory listing, however many
shards); nothing is memory-mapped yet. A shard is opened when first read (its size and .npy header
checked then) and kept in a bounded LRU of open shards, so a dataset of 10^5 shards never holds
more than `max_open_shards` maps (Linux allows 65530 per process, `vm.max_map_count`). Each read
is checked as `verify` says (`titans_train.data.shards.VERIFY_LEVELS`); `verify_all()` (`titans-train
data verify`) reads every byte against the manifest's sha256.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from titans_train.data.errors import ManifestError, ShardError
from titans_train.data.manifest import Manifest, check_compatible, read_manifest
from titans_train.data.shards import SAMPLED_EVERY, VERIFY_LEVELS, ShardInfo, ShardReader, digests_name
from titans_train.data.tokenizer import load_tokenizer

MAX_OPEN_SHARDS = 1024


class PreparedDataset:
    def __init__(self, directory: str, tokenizer=None, seq_len: int | None = None, *, verify: str = "full",
                 max_open_shards: int = MAX_OPEN_SHARDS) -> None:
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        self.directory = os.path.abspath(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        check_compatible(self.manifest, self.directory, tokenizer, seq_len)
        self.verify = verify
        self._layout = self.manifest.layout
        self.max_open_shards = max(1, max_open_shards)
        self._fix = f"prepare the dataset in {self.directory} again (titans-train data prepare ... --overwrite)"
        counts = np.fromiter((shard["samples"] for shard in self.manifest.shards), dtype=np.int64,
                             count=len(self.manifest.shards))
        self._shard_starts = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts, dtype=np.int64)])
        self._open: OrderedDict[int, ShardReader] = OrderedDict()  # shard id -> open reader, oldest first
        self._checked: set[int] = set()  # shards whose header and digest file an earlier open checked
        self._reads = 0  # samples read (which ones "sampled" checks: 1 in SAMPLED_EVERY)
        self._check_present()

    def _check_present(self) -> None:
        """Every shard (and, when content checks are on, its digest file) exists: missing files
        fail now, not hours into a run. One listing, not a stat per shard."""
        if self.verify != "none" and not all(shard.get("digests_sha256") for shard in self.manifest.shards):
            raise ManifestError(
                f"{self.directory} was prepared by an older titans-train, without member digests; "
                f"{self._fix}, or set data.verify=none to train without content checks"
            )
        present = set(os.listdir(self.directory))
        needed = [shard["file"] for shard in self.manifest.shards]
        if self.verify != "none":
            needed += [digests_name(shard["file"]) for shard in self.manifest.shards if shard.get("digests_sha256")]
        missing = [name for name in needed if name not in present]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ShardError(f"shard file {os.path.join(self.directory, missing[0])}{more} is missing; {self._fix}")

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def open_shards(self) -> int:
        return len(self._open)

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def _new_reader(self, shard_id: int) -> ShardReader:
        info = ShardInfo(**self.manifest.shards[shard_id])
        return ShardReader(os.path.join(self.directory, info.file), info, self._layout, self._fix,
                           self.verify, self.manifest.tokenizer["vocab_size"])

    def _reader(self, shard_id: int) -> ShardReader:
        """The open reader of a shard, opening it (and closing the least recently used) if needed."""
        reader = self._open.get(shard_id)
        if reader is not None:
            self._open.move_to_end(shard_id)
            return reader
        reader = self._new_reader(shard_id)
        reader.open(checked=shard_id in self._checked)
        self._checked.add(shard_id)
        self._open[shard_id] = reader
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)[1].close()
        return reader

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, sample index within the shard) of each global sample index, int64."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.directory}")
        shard_ids = np.searchsorted(self._shard_starts, indices, side="right") - 1
        return shard_ids, indices - self._shard_starts[shard_ids]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(keys (n,), tokens (n, seq_len + 1) int64) of the samples at `indices`."""
        shard_ids, members = self.locate(indices)
        keys = np.empty(len(shard_ids), dtype=np.int64)
        tokens = np.empty((len(shard_ids), self.manifest.seq_len + 1), dtype=np.int64)
        for row, (shard_id, member) in enumerate(zip(shard_ids.tolist(), members.tolist())):
            self._reads += 1
            check = self.verify == "full" or (self.verify == "sampled" and self._reads % SAMPLED_EVERY == 1)
            keys[row], tokens[row] = self._reader(shard_id).read(member, check_digest=check)
        return keys, tokens

    def verify_all(self) -> None:
        """Every shard's size, header and whole-file sha256 (and digest file) against the manifest."""
        for shard_id in range(self.num_shards):
            reader = self._new_reader(shard_id)
            reader.verify_checksum()
            reader.close()
