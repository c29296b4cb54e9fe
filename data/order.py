"""The global sample order: a pure function of (seed, epoch, position), with O(1) memory.

`permute(positions, n, seed, epoch)` is a seeded pseudo-random permutation of [0, n) evaluated at
any positions without materialising it: a 6-round Feistel network on the smallest even-bit domain
>= n, with cycle walking to stay inside [0, n). Every rank computes only the indices it reads, so
the order costs nothing to build even for 10^12 samples, and resuming is skipping ahead.

`MixtureSchedule` interleaves several datasets with fixed weights: the stream is cut into blocks of
BLOCK positions; each block holds exactly round(weight * BLOCK) positions of each dataset
(largest remainders), in a seeded order. So the number of draws from dataset k before any global
position is computable in O(BLOCK), and each dataset advances through its own epochs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from titans_train.data.errors import DataError

FEISTEL_ROUNDS = 6
MIXTURE_BLOCK = 4096
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def derive_seed(*parts) -> int:
    """A 64-bit seed from any parts (ints, strings), stable across processes and versions."""
    text = "\0".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _mix(values: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a well-mixed 64-bit hash; uint64 arithmetic wraps as intended.
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _feistel(values: np.ndarray, half_bits: int, round_keys: list[np.uint64]) -> np.ndarray:
    half_mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = values >> shift, values & half_mask
    for key in round_keys:
        left, right = right, left ^ (_mix(right ^ key) & half_mask)
    return (left << shift) | right


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The images of `positions` (each in [0, n)) under the permutation of [0, n) for (seed, epoch)."""
    positions = np.asarray(positions, dtype=np.int64)
    if n <= 0:
        raise ValueError(f"cannot permute an empty range (n={n})")
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(positions)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    round_keys = [np.uint64(derive_seed("feistel", seed, epoch, r)) for r in range(FEISTEL_ROUNDS)]
    values = _feistel(positions.astype(np.uint64), bits // 2, round_keys)
    # Cycle walking: the domain is < 4n, so a few re-applications bring every value inside [0, n).
    outside = values >= np.uint64(n)
    while outside.any():
        values[outside] = _feistel(values[outside], bits // 2, round_keys)
        outside = values >= np.uint64(n)
    return values.astype(np.int64)


class MixtureSchedule:
    """Which dataset each global position draws from, and that dataset's own draw count."""

    def __init__(self, weights: list[float], seed: int) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or (weights <= 0).any() or not np.isfinite(weights).all():
            raise DataError(f"mixture weights must be positive finite numbers, got {weights.tolist()}")
        share = weights / weights.sum() * MIXTURE_BLOCK
        counts = np.floor(share).astype(np.int64)
        # Largest remainders fill the block exactly; ties go to the earlier dataset.
        leftovers = np.argsort(-(share - counts), kind="stable")[: MIXTURE_BLOCK - counts.sum()]
        counts[leftovers] += 1
        if (counts == 0).any():
            raise DataError(
                f"mixture weight {weights[counts == 0].tolist()} is below 1/{MIXTURE_BLOCK} of the total; "
                "raise it or drop that dataset"
            )
        self.counts = counts
        self.seed = seed
        self._cached_block: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot, draws of that slot's dataset earlier in the block) for one block."""
        if self._cached_block is None or self._cached_block[0] != block:
            slots = np.repeat(np.arange(len(self.counts)), self.counts)
            slots = slots[permute(np.arange(MIXTURE_BLOCK), MIXTURE_BLOCK, derive_seed("mixture", self.seed), block)]
            earlier = np.zeros(MIXTURE_BLOCK, dtype=np.int64)
            for dataset in range(len(self.counts)):
                mask = slots == dataset
                earlier[mask] = np.arange(mask.sum())
            self._cached_block = (block, slots, earlier)
        return self._cached_block[1], self._cached_block[2]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, per-dataset draw number) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        datasets = np.empty_like(positions)
        draws = np.empty_like(positions)
        blocks = positions // MIXTURE_BLOCK
        for block in np.unique(blocks):
            mask = blocks == block
            slots, earlier = self._block(int(block))
            offsets = positions[mask] % MIXTURE_BLOCK
            datasets[mask] = slots[offsets]
            draws[mask] = block * self.counts[slots[offsets]] + earlier[offsets]
        return datasets, draws
