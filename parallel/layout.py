"""The (tp, sp, dp) rank grid as pure arithmetic: no process groups, testable for any world size.

Rank order, fastest-varying first: tp, then sp, then dp (DESIGN section 6), so
`rank = tp_rank + tp * (sp_rank + sp * dp_rank)`. The tensor-parallel ranks of one head group
are neighbours (on a GPU node they share the fast links), the span owners of one sequence come
next, and data-parallel replicas are the slowest axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from titans_train.errors import ConfigError


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot run. `key` names the config entry at fault."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class RankCoordinates:
    tp_rank: int
    sp_rank: int
    dp_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of tensor (tp), sequence (sp) and data (dp) parallelism; world = tp * sp * dp."""

    tp: int
    sp: int
    dp: int

    def __post_init__(self) -> None:
        for key, value in (("parallel.tp", self.tp), ("parallel.sp", self.sp), ("dp", self.dp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(key, f"must be a positive integer, got {value!r}")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, sp: int = 1) -> ParallelLayout:
        """dp is what remains of the world once tp and sp are placed."""
        for key, value in (("parallel.tp", tp), ("parallel.sp", sp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(key, f"must be a positive integer, got {value!r}")
        if world_size < 1:
            raise ParallelConfigError("world_size", f"must be >= 1, got {world_size}")
        if world_size % (tp * sp) != 0:
            raise ParallelConfigError(
                "parallel.tp" if world_size % tp else "parallel.sp",
                f"world size {world_size} is not divisible by parallel.tp x parallel.sp = "
                f"{tp} x {sp} = {tp * sp} (the world is tp x sp x dp). Divisors of {world_size}: "
                f"{_divisors(world_size)}; choose parallel.tp and parallel.sp whose product is "
                f"one of them, or launch a multiple of {tp * sp} processes.",
            )
        return cls(tp=tp, sp=sp, dp=world_size // (tp * sp))

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.dp

    def rank_of(self, tp_rank: int, sp_rank: int, dp_rank: int) -> int:
        if not (0 <= tp_rank < self.tp and 0 <= sp_rank < self.sp and 0 <= dp_rank < self.dp):
            raise IndexError(f"coordinates ({tp_rank}, {sp_rank}, {dp_rank}) outside {self}")
        return tp_rank + self.tp * (sp_rank + self.sp * dp_rank)

    def coordinates(self, rank: int) -> RankCoordinates:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside a world of {self.world_size}")
        return RankCoordinates(
            tp_rank=rank % self.tp,
            sp_rank=(rank // self.tp) % self.sp,
            dp_rank=rank // (self.tp * self.sp),
        )

    # Groups: each list holds the global ranks of one group, ordered by the group-local rank.
    def tp_group(self, rank: int) -> list[int]:
        c = self.coordinates(rank)
        return [self.rank_of(t, c.sp_rank, c.dp_rank) for t in range(self.tp)]

    def sp_group(self, rank: int) -> list[int]:
        c = self.coordinates(rank)
        return [self.rank_of(c.tp_rank, s, c.dp_rank) for s in range(self.sp)]

    def dp_group(self, rank: int) -> list[int]:
        c = self.coordinates(rank)
        return [self.rank_of(c.tp_rank, c.sp_rank, d) for d in range(self.dp)]

    def gradient_group(self, rank: int) -> list[int]:
        """dp x sp: every rank holding the same tp shard of the parameters (sp fastest)."""
        c = self.coordinates(rank)
        return [
            self.rank_of(c.tp_rank, s, d) for d in range(self.dp) for s in range(self.sp)
        ]

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind ("tp", "sp", "dp", "gradient"), each listed once."""
        getter = {
            "tp": self.tp_group,
            "sp": self.sp_group,
            "dp": self.dp_group,
            "gradient": self.gradient_group,
        }[kind]
        groups: list[list[int]] = []
        for rank in range(self.world_size):
            group = getter(rank)
            if group not in groups:
                groups.append(group)
        return groups

    def sp_neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """Global ranks of the previous and next span owners (None at the sequence ends)."""
        c = self.coordinates(rank)
        previous = self.rank_of(c.tp_rank, c.sp_rank - 1, c.dp_rank) if c.sp_rank > 0 else None
        following = (
            self.rank_of(c.tp_rank, c.sp_rank + 1, c.dp_rank) if c.sp_rank + 1 < self.sp else None
        )
        return previous, following
