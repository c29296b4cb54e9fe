"""`TokenLoader`: this rank's micro-batches of a deterministic, resumable global sample stream.

The contract (see docs/data.md):
- The global stream is a pure function of (seed, position): global position g maps to a dataset
  (mixtures: `MixtureSchedule`), that dataset's draw number c, its epoch c // N and its sample
  `permute(c % N, N, seed, epoch)`. Passing the end of a dataset rolls into its next epoch.
- Global batch b is positions [b * G, (b + 1) * G) (G = global_batch_size); data-parallel rank r
  takes the contiguous slice [r * G / dp, (r + 1) * G / dp) of it and yields it in micro-batches.
  Tensor- and sequence-parallel ranks of one replica pass the same dp rank and get the same
  batches; `sequence_span` cuts a sequence-parallel rank's span out of a micro-batch.
- The state is the number of global samples consumed (+ seed, epoch, fingerprint): resuming on
  any number of data-parallel ranks or loader workers continues the identical global stream.
- Scale: positions, counts and indices are Python ints or int64 end to end (never int32 or
  float), and a step costs O(micro-batch) whatever the position: `permute` evaluates only the
  positions read, and a mixture computes one block of MIXTURE_BLOCK slots. So 10^12 tokens and
  10^9 steps are ordinary numbers here.
Loader workers (torch DataLoader) only fetch micro-batches whose positions were fixed beforehand,
so they change speed, never order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from titans_train.data.dataset import PreparedDataset
from titans_train.data.errors import DataError
from titans_train.data.order import MixtureSchedule, derive_seed, permute


class LoaderConfigError(DataError, ValueError):
    """Batch sizes or ranks that cannot be split as asked."""


class LoaderStateError(DataError):
    """A saved loader state that does not belong to this data or seed."""


def sequence_span(batch: torch.Tensor, sp_rank: int, sp_world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T / P), of sequence-parallel rank r for a (B, T + 1) batch.

    Rank r owns input tokens [r * T / P, (r + 1) * T / P) and the targets shifted by one.
    """
    seq_len = batch.shape[-1] - 1
    if seq_len % sp_world_size:
        raise LoaderConfigError(
            f"seq_len {seq_len} is not divisible by the sequence-parallel size {sp_world_size}; "
            "pick a seq_len that is a multiple of it"
        )
    if not 0 <= sp_rank < sp_world_size:
        raise LoaderConfigError(f"sp_rank {sp_rank} is outside [0, {sp_world_size})")
    span = seq_len // sp_world_size
    start = sp_rank * span
    return batch[:, start : start + span], batch[:, start + 1 : start + span + 1]


def _parse_datasets(datasets) -> tuple[list[str], list[float]]:
    """A path, a list of paths (equal weights), a list of (path, weight) or a {path: weight} dict."""
    if isinstance(datasets, (str, os.PathLike)):
        return [os.fspath(datasets)], [1.0]
    if isinstance(datasets, dict):
        return [os.fspath(p) for p in datasets], [float(w) for w in datasets.values()]
    paths, weights = [], []
    for item in datasets:
        if isinstance(item, (tuple, list)):
            paths.append(os.fspath(item[0]))
            weights.append(float(item[1]))
        else:
            paths.append(os.fspath(item))
            weights.append(1.0)
    if not paths:
        raise LoaderConfigError("TokenLoader needs at least one prepared dataset directory")
    return paths, weights


class GlobalStream:
    """Global position -> (dataset, sample index): the whole order, shared by every rank."""

    def __init__(self, datasets: list[PreparedDataset], weights: list[float], seed: int, shuffle: bool) -> None:
        self.datasets = datasets
        self.seed = seed
        self.shuffle = shuffle
        self.mixture = MixtureSchedule(weights, seed) if len(datasets) > 1 else None
        content = "\0".join(f"{d.fingerprint}:{w!r}" for d, w in zip(datasets, weights))
        self.fingerprint = hashlib.sha256(f"{content}\0shuffle={shuffle}".encode()).hexdigest()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, sample index) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.mixture is None:
            which, draws = np.zeros_like(positions), positions
        else:
            which, draws = self.mixture.locate(positions)
        samples = np.empty_like(positions)
        for k, dataset in enumerate(self.datasets):
            mask = which == k
            if not mask.any():
                continue
            size = len(dataset)
            epochs, offsets = np.divmod(draws[mask], size)
            if not self.shuffle:
                samples[mask] = offsets
                continue
            out = np.empty_like(offsets)
            for epoch in np.unique(epochs):
                in_epoch = epochs == epoch
                out[in_epoch] = permute(offsets[in_epoch], size, derive_seed(self.seed, k), int(epoch))
            samples[mask] = out
        return which, samples

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset index, key, tokens (n, seq_len + 1) int64) at the global positions."""
        which, samples = self.locate(positions)
        keys = np.empty(len(samples), dtype=np.int64)
        tokens = np.empty((len(samples), self.datasets[0].seq_len + 1), dtype=np.int64)
        for k, dataset in enumerate(self.datasets):
            mask = which == k
            if mask.any():
                keys[mask], tokens[mask] = dataset.read(samples[mask])
        return which, keys, tokens

    def epoch(self, position: int) -> int:
        """Completed passes: over the dataset, or (mixtures) over the datasets' total size."""
        return position // sum(len(d) for d in self.datasets)


class _MicroBatchFetcher(torch.utils.data.Dataset):
    """Map-style view for torch DataLoader workers: item = the start position of a micro-batch."""

    def __init__(self, stream: GlobalStream, micro_batch_size: int) -> None:
        self.stream = stream
        self.micro_batch_size = micro_batch_size

    def __getitem__(self, start: int) -> torch.Tensor | DataError:
        try:
            _, _, tokens = self.stream.read(np.arange(start, start + self.micro_batch_size, dtype=np.int64))
        except DataError as error:
            # Returned, not raised: a DataLoader worker would wrap it in a multi-line traceback
            # message; the loader raises this very error in the main process instead.
            return error
        return torch.from_numpy(tokens)  # (micro_batch, seq_len + 1) int64

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs the method to exist
        return 2**62


class TokenLoader:
    """Yields this data-parallel rank's micro-batches, LongTensor (micro_batch_size, seq_len + 1)."""

    def __init__(
        self,
        datasets,
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
        tokenizer=None,
        shuffle: bool = True,
        num_workers: int = 0,
        verify: str = "full",
    ) -> None:
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise LoaderConfigError(f"dp_rank {dp_rank} is outside [0, dp_world_size={dp_world_size})")
        if global_batch_size % dp_world_size:
            raise LoaderConfigError(
                f"global_batch_size {global_batch_size} is not divisible by the data-parallel size "
                f"{dp_world_size}; make it a multiple of {dp_world_size}"
            )
        per_rank = global_batch_size // dp_world_size
        if micro_batch_size < 1 or per_rank % micro_batch_size:
            raise LoaderConfigError(
                f"each data-parallel rank gets {per_rank} samples per global batch, not a multiple of "
                f"micro_batch_size {micro_batch_size}; choose global_batch_size = dp x micro x accumulation"
            )
        paths, weights = _parse_datasets(datasets)
        opened = [PreparedDataset(p, tokenizer, seq_len, verify=verify) for p in paths]
        self.stream = GlobalStream(opened, weights, seed, shuffle)
        self.seq_len = seq_len
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.num_workers = num_workers
        self.micro_batches_per_step = per_rank // micro_batch_size  # gradient accumulation steps
        self._samples_consumed = 0  # global positions of all completed global batches
        self._micro_in_batch = 0  # micro-batches of the current global batch already yielded

    @property
    def samples_consumed(self) -> int:
        return self._samples_consumed

    @property
    def epoch(self) -> int:
        return self.stream.epoch(self._samples_consumed)

    def _micro_batch_starts(self) -> Iterator[int]:
        """Start positions of this rank's micro-batches, from the current position on, forever."""
        rank_span = self.global_batch_size // self.dp_world_size
        batch_start = self._samples_consumed
        micro = self._micro_in_batch
        while True:
            rank_start = batch_start + self.dp_rank * rank_span
            for index in range(micro, self.micro_batches_per_step):
                yield rank_start + index * self.micro_batch_size
            batch_start += self.global_batch_size
            micro = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        fetcher = _MicroBatchFetcher(self.stream, self.micro_batch_size)
        if self.num_workers > 0:
            batches = iter(torch.utils.data.DataLoader(
                fetcher, batch_size=None, sampler=self._micro_batch_starts(),
                num_workers=self.num_workers, multiprocessing_context="fork",
            ))
        else:
            batches = map(fetcher.__getitem__, self._micro_batch_starts())
        for batch in batches:
            if isinstance(batch, DataError):
                raise batch
            # Count before yielding: a state saved right after the last micro-batch of a global
            # batch (that is, after the optimizer step) must already include that batch.
            self._micro_in_batch += 1
            if self._micro_in_batch == self.micro_batches_per_step:
                self._samples_consumed += self.global_batch_size
                self._micro_in_batch = 0
            yield batch

    def rewind(self) -> None:
        """Back to position 0: a validation loader (shuffle=False) yields the same batches again."""
        self._samples_consumed = 0
        self._micro_in_batch = 0

    def state_dict(self) -> dict:
        if self._micro_in_batch:
            raise LoaderStateError(
                f"loader state requested after {self._micro_in_batch} of {self.micro_batches_per_step} "
                "micro-batches of a global batch; save it after the optimizer step, when whole "
                "global batches are consumed (the state must not depend on the data-parallel size)"
            )
        return {
            "samples_consumed": self._samples_consumed,
            "seed": self.seed,
            "epoch": self.epoch,
            "fingerprint": self.stream.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.stream.fingerprint:
            raise LoaderStateError(
                "the saved loader state belongs to other data (dataset fingerprint "
                f"{str(state.get('fingerprint'))[:12]} != {self.stream.fingerprint[:12]}); resume with the "
                "same prepared datasets and weights, or start the data stream fresh"
            )
        if state.get("seed") != self.seed:
            raise LoaderStateError(
                f"the saved loader state used seed {state.get('seed')} but this loader has seed "
                f"{self.seed}; set the data seed back to {state.get('seed')}"
            )
        samples = state.get("samples_consumed")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            # A float (say, through JSON or a float tensor) is exact only below 2^53 samples.
            raise LoaderStateError(f"the saved loader state's samples_consumed is {samples!r}, not a non-negative "
                                   "integer; it was not written by this loader")
        samples = int(samples)
        if state.get("epoch") != self.stream.epoch(samples):
            raise LoaderStateError(f"the saved loader state is inconsistent (epoch {state.get('epoch')} "
                                   f"at sample {samples}); it was not written by this loader")
        self._samples_consumed = samples
        self._micro_in_batch = 0
