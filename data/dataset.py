"""`PreparedDataset`: random access to the samples of one prepared directory, by global index.

Sample indices run over the shards in manifest order. Opening checks the manifest and the run's
tokenizer / seq_len; each shard's size is checked when it is first read (cheap), its sha256 only on
request (`verify_checksums=True`, or `titans-train data verify`).
"""

from __future__ import annotations

import os

import numpy as np

from titans_train.data.manifest import Manifest, check_compatible, read_manifest
from titans_train.data.shards import ShardReader
from titans_train.data.tokenizer import load_tokenizer


class PreparedDataset:
    def __init__(self, directory: str, tokenizer=None, seq_len: int | None = None,
                 verify_checksums: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        check_compatible(self.manifest, self.directory, tokenizer, seq_len)
        fix = f"prepare the dataset in {self.directory} again (titans-train data prepare ... --overwrite)"
        layout = self.manifest.layout
        self.shards = [
            ShardReader(os.path.join(self.directory, info.file), info, layout, fix)
            for info in self.manifest.shard_infos()
        ]
        counts = np.array([info.samples for info in self.manifest.shard_infos()], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)])
        for shard in self.shards:
            shard.open()  # missing or truncated shards fail now, not hours into a run
            if verify_checksums:
                shard.verify_checksum()

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(keys (n,), tokens (n, seq_len + 1) int64) of the samples at `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.directory}")
        shard_ids = np.searchsorted(self._shard_starts, indices, side="right") - 1
        keys = np.empty(len(indices), dtype=np.int64)
        tokens = np.empty((len(indices), self.manifest.seq_len + 1), dtype=np.int64)
        for row, (shard_id, index) in enumerate(zip(shard_ids, indices)):
            keys[row], tokens[row] = self.shards[shard_id].read(int(index - self._shard_starts[shard_id]))
        return keys, tokens
