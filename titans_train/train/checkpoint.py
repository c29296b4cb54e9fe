"""Atomic, self-checking training checkpoints on top of DeepSpeed's save/load.

Layout of `checkpoint.dir`:

    latest                      the tag of the newest confirmed checkpoint (written temp + rename)
    step000001000/              one DeepSpeed checkpoint (model, optimizer, scheduler shards)
        titans_checkpoint.json  the manifest: written last, lists every file with its size and
                                content digest (xxh3-128), and the run's resolved config
        rank00000_state.pt      per-rank state (RNG states of python, numpy, torch)
    .partial-step000002000/     a save in progress, or one cut short: never read
    .pending-step000002000/     complete, not yet confirmed by a finite loss: never read
    .deleting-step000000500/    being deleted (pruning, a discarded or replaced checkpoint)
    universal/step000001000/    copies re-cut to resume on another layout (`CheckpointManager.universal_copy`)

A save writes into `.partial-<tag>` on every rank, waits for all ranks, digests the files (each
rank its share), then rank 0 writes the manifest and renames the directory to `.pending-<tag>`.
The checkpoint is promoted (`confirm`: renamed to `<tag>`, `latest` pointed at it, all but the
newest `keep_last` deleted) only once a finite loss has been computed with its weights; a
non-finite one deletes it (`discard`). Deleting renames to `.deleting-<name>` first, so a kill
midway never leaves a half-deleted `<tag>`; `clean_leftovers` removes what a dead job left.
A `<tag>` without a valid manifest, or whose files do not match it (size, then digest), is
damaged: resume reports it and falls back to the previous complete checkpoint. The directory
must be on a file system every rank sees (the usual shared scratch of a cluster).

Who writes what (`assign_checkpoint_writers` decides DeepSpeed's part):
- DeepSpeed's model states (`mp_rank_XX_model_states.pt`): data-parallel rank 0 of each tp rank;
  its ZeRO shards (`*_optim_states.pt`, ZeRO-3 parameter shards): every rank of the ZeRO
  partition group. Under ZeRO-3 with sp > 1 that group is dp alone, so the sp ranks of a replica
  would write the same file names with the same contents: only sp rank 0 writes them.
- this module: every rank its `rank<NNNNN>_state.pt` and the digests of its share of the files;
  rank 0 the manifest, the renames, `latest` and pruning.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from titans_train.errors import UserError
from titans_train.train.distributed import all_gather_objects, barrier
from titans_train.train.file_digest import ALGORITHM as DIGEST_ALGORITHM
from titans_train.train.file_digest import file_digest

MANIFEST = "titans_checkpoint.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
PENDING_PREFIX = ".pending-"
DELETING_PREFIX = ".deleting-"
LEFTOVER_PREFIXES = (PARTIAL_PREFIX, PENDING_PREFIX, DELETING_PREFIX)
UNIVERSAL_DIR = "universal"
FORMAT_VERSION = 2  # 2: content digests ("digests"); 1 (sizes only) is still read
TAG_PATTERN = re.compile(r"^step(\d{9})$")


def assign_checkpoint_writers(engine, context) -> None:
    """Set which of DeepSpeed's files this rank writes (module docstring). Call once per engine."""
    from titans_train.parallel.zero import zero_partitions_over_sp

    replicated_over_sp = not zero_partitions_over_sp(engine.zero_optimization_stage(), context.sp_size)
    if replicated_over_sp and context.sp_rank > 0:
        # Same dp rank and tp rank as sp rank 0, so the same file names, and the same contents.
        engine.save_zero_checkpoint = False
        engine.save_non_zero_checkpoint = False


def _separate_step_counters(optimizer) -> None:
    """Give every optimizer state its own `step` tensor (see `CheckpointManager.load`)."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def tag_for_step(step: int) -> str:
    return f"step{step:09d}"


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NoUsableCheckpoint(UserError):
    pass


class CheckpointWriteError(UserError):
    """A save the file system had no room for (the previous checkpoint is untouched)."""


# Below this many free bytes a failed write is taken for a full file system: torch's zip writer
# reports ENOSPC as a RuntimeError without an errno ("unexpected pos", "file write failed").
OUT_OF_SPACE_BYTES = 16 * 2**20


def _out_of_space(error: BaseException, directory: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < OUT_OF_SPACE_BYTES
    except OSError:
        return False


def _digests(directory: Path, names: list[str], rank: int, world_size: int) -> dict[str, str]:
    """name -> digest of every file in `names`, each rank digesting its share (collective if
    world_size > 1). An unreadable file gets a digest that matches nothing."""
    share = {}
    for name in names[rank::world_size]:
        try:
            share[name] = file_digest(directory / name)
        except OSError as error:
            share[name] = f"unreadable ({error.strerror or error})"
    if world_size == 1:
        return share
    merged: dict[str, str] = {}
    for part in all_gather_objects(share):
        merged.update(part)
    return merged


def content_damage(path: Path, manifest: dict[str, Any], rank: int = 0, world_size: int = 1) -> str:
    """"" if every file of the checkpoint at `path` has its manifest digest, else the reason,
    naming the first file that differs. A manifest without digests (format 1) passes. Collective
    with world_size > 1: every rank calls it, each digests its share of the files."""
    expected = manifest.get("digests")
    if expected is None:
        return ""
    names = sorted(expected)
    actual = _digests(path, names, rank, world_size)
    for name in names:
        if actual[name] != expected[name]:
            return (f"{path / name} does not match its {manifest.get('digest_algorithm', DIGEST_ALGORITHM)} digest "
                    "in the manifest: its bytes changed after the save")
    return ""


def check_structure(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") if `path` has a readable manifest and every file it lists with that size,
    else (None, reason). Cheap: reads no file's contents."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"unreadable {MANIFEST}: {error}"
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return None, f"missing file {name}"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    return manifest, ""


def verify_checkpoint(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") for a complete, undamaged checkpoint (structure, sizes, then every file's
    digest), (None, reason) otherwise. One process; conversion reads checkpoints through it."""
    path = Path(path)
    manifest, reason = check_structure(path)
    if manifest is not None:
        reason = content_damage(path, manifest)
    return (manifest, "") if not reason else (None, reason)


@dataclass(frozen=True)
class CheckpointInfo:
    tag: str
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, rank: int, world_size: int,
                 log: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.log = log

    # ---- saving -------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any], manifest_extra: dict[str, Any]) -> Path:
        """Save on every rank; returns the `.pending-<tag>` directory once it is complete.
        It is not `latest` until `confirm` (or deleted by `discard`)."""
        tag = tag_for_step(step)
        partial_tag = PARTIAL_PREFIX + tag
        partial = self.directory / partial_tag
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # the leftover of a save cut short
        barrier()
        try:
            engine.save_checkpoint(str(self.directory), tag=partial_tag, client_state=client_state, save_latest=False)
            torch.save({"rng": rng_state()}, partial / f"rank{self.rank:05d}_state.pt")
        except (OSError, RuntimeError) as error:
            if not _out_of_space(error, self.directory):
                raise
            free = shutil.disk_usage(self.directory).free
            shutil.rmtree(partial, ignore_errors=True)  # give back what this save took
            raise CheckpointWriteError(
                f"no space left on device for checkpoint {tag} in {self.directory} ({free / 2**20:.1f} MiB free); "
                "the previous checkpoint is intact and stays latest. Free space or point checkpoint.dir at a "
                "larger file system, then run the same command again: it resumes from that checkpoint") from error
        barrier()
        names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        digests = _digests(partial, names, self.rank, self.world_size)
        pending = self.directory / (PENDING_PREFIX + tag)
        if self.rank == 0:
            files = {name: (partial / name).stat().st_size for name in names}
            manifest = {"format": FORMAT_VERSION, "tag": tag, "step": step, "time": time.time(),
                        "world_size": self.world_size, "files": files, "digest_algorithm": DIGEST_ALGORITHM,
                        "digests": digests, **manifest_extra}
            _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            self._remove(pending)
            os.replace(partial, pending)
        barrier()
        return pending

    def confirm(self, pending: Path) -> Path:
        """Promote a pending checkpoint (a finite loss has seen its weights): rename it to its tag,
        point `latest` at it, prune. Every rank calls it; returns the final directory."""
        final = self.directory / pending.name.removeprefix(PENDING_PREFIX)
        if self.rank == 0:
            # A checkpoint of the same step from an earlier attempt, and its universal copy.
            self._remove(self.directory / UNIVERSAL_DIR / final.name)
            self._remove(final)
            os.replace(pending, final)
            _write_atomic(self.directory / LATEST, final.name + "\n")
            self._prune()
        barrier()
        return final

    def discard(self, pending: Path) -> None:
        """Delete a pending checkpoint whose weights gave a non-finite loss. Every rank calls it."""
        if self.rank == 0:
            self._remove(pending)
        barrier()

    def _remove(self, path: Path) -> None:
        """Delete a directory crash-safely: renamed out of the way first, so a kill midway leaves
        a `.deleting-` leftover (removed at the next start), never a half-deleted checkpoint."""
        if not path.exists():
            return
        doomed = path.with_name(DELETING_PREFIX + path.name.removeprefix(PENDING_PREFIX))
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for info in complete[: -self.keep_last]:
            self._remove(self.directory / UNIVERSAL_DIR / info.tag)
            self._remove(info.path)

    def clean_leftovers(self) -> None:
        """Remove what a dead job left (`.partial-`, `.pending-`, `.deleting-` directories, also
        in universal/ and universal/<tag>/): none of them is ever read. Every rank calls it at the
        start of a run."""
        if self.rank == 0:
            universal = self.directory / UNIVERSAL_DIR
            copies = [path for path in universal.iterdir() if path.is_dir()] if universal.is_dir() else []
            for parent in (self.directory, universal, *copies):
                if not parent.is_dir():
                    continue
                for leftover in parent.iterdir():
                    if leftover.is_dir() and leftover.name.startswith(LEFTOVER_PREFIXES):
                        self.log(f"[checkpoint] removing {leftover} (left by a job that did not finish)")
                        shutil.rmtree(leftover, ignore_errors=True)
        barrier()

    # ---- finding ------------------------------------------------------------------------------
    def verify(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        """(manifest, "") for a complete checkpoint, (None, reason) for a damaged one: the cheap
        check (`check_structure`); `newest_usable` also checks the contents."""
        return check_structure(path)

    def complete_checkpoints(self) -> list[CheckpointInfo]:
        """Every complete checkpoint, oldest first (damaged ones are skipped silently here)."""
        found = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.iterdir():
            if path.is_dir() and TAG_PATTERN.match(path.name):
                manifest, _ = self.verify(path)
                if manifest is not None:
                    found.append(CheckpointInfo(path.name, path, manifest))
        return sorted(found, key=lambda info: info.step)

    def candidates(self) -> list[CheckpointInfo | tuple[str, str]]:
        """Checkpoints to try, newest first: `latest` first, then every other tag by step.

        Damaged ones appear as (tag, reason) so the caller can report them.
        """
        if not self.directory.is_dir():
            return []
        tags = sorted((p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)),
                      reverse=True)
        latest_file = self.directory / LATEST
        if latest_file.is_file():
            latest = latest_file.read_text().strip()
            if latest in tags:
                tags.remove(latest)
                tags.insert(0, latest)
            elif latest:
                self.log(f"[checkpoint] `latest` names {latest!r}, which does not exist; looking for others")
        result: list[CheckpointInfo | tuple[str, str]] = []
        for tag in tags:
            manifest, reason = self.verify(self.directory / tag)
            result.append(CheckpointInfo(tag, self.directory / tag, manifest) if manifest else (tag, reason))
        return result

    def newest_usable(self) -> CheckpointInfo | None:
        """The checkpoint to resume from: the first candidate whose files all match the manifest
        (contents included, each rank digesting its share: every rank calls this). A damaged one
        is reported once and the previous one tried; None when there is no checkpoint at all.
        Raises `NoUsableCheckpoint` when every checkpoint there is damaged."""
        damaged = []
        for candidate in self.candidates():
            if isinstance(candidate, CheckpointInfo):
                reason = content_damage(candidate.path, candidate.manifest, self.rank, self.world_size)
                if not reason:
                    return candidate
                tag = candidate.tag
            else:
                tag, reason = candidate
            self.log(f"checkpoint {tag} is damaged ({reason}); trying the previous one")
            damaged.append(tag)
        if damaged:
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.directory}: {', '.join(damaged)} damaged (see the warnings above); "
                "restore them from a copy, or move them out of that directory to start this run afresh")
        return None

    # ---- loading ------------------------------------------------------------------------------
    def universal_copy(self, info: CheckpointInfo, route: str, engine, tp_size: int) -> Path:
        """The copy of `info` that `route` (`titans_train.convert.reshard.ROUTES`) loads on this
        layout, made once (by rank 0, temp dir + rename) under `universal/<tag>/`:
        "deepspeed" DeepSpeed's universal checkpoint (`ds_to_universal`); "tensor_parallel" one
        universal checkpoint per tp rank (`convert.universal`); "zero0" ZeRO-0 files for tp_size
        (`convert.reshard`)."""
        name = route if route == "deepspeed" else f"{route}-tp{tp_size}"
        target = self.directory / UNIVERSAL_DIR / info.tag / name
        if self.rank == 0 and not (target / MANIFEST).is_file():
            partial = target.with_name(PARTIAL_PREFIX + name)
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            if route == "deepspeed":
                from deepspeed.checkpoint import ds_to_universal

                args = SimpleNamespace(input_folder=str(info.path), output_folder=str(partial), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True)
                ds_to_universal.main(args)
            elif route == "tensor_parallel":
                from titans_train.convert.universal import write_universal

                partial.mkdir()
                write_universal(info.path, info.manifest, partial, tp_size)
            else:
                from titans_train.convert.reshard import write_zero0_for_tp
                from titans_train.model import no_weight_decay

                names = {id(param): name.removeprefix("model.") for name, param in engine.module.named_parameters()}
                groups = [[names[id(param)] for param in group["params"]] for group in engine.optimizer.param_groups]
                partial.mkdir()
                write_zero0_for_tp(info.path, info.manifest, partial, tp_size, groups,
                                   list(engine.module.state_dict().keys()), no_weight_decay)
            shutil.copy2(info.path / MANIFEST, partial / MANIFEST)  # the copy's completion mark
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        barrier()
        return target

    def load(self, engine, info: CheckpointInfo, route: str = "same", tp_rank: int = 0, tp_size: int = 1) -> dict[str, Any]:
        """Load `info` into `engine` through `route` (`titans_train.convert.reshard.resume_route`);
        returns the client state. Restores this rank's RNG state."""
        load_dir, tag = info.path.parent, info.tag
        if route != "same":
            copy = self.universal_copy(info, route, engine, tp_size)
            if route == "tensor_parallel":
                from titans_train.convert.universal import universal_rank_dir

                load_dir, tag = copy, universal_rank_dir(tp_rank)
            else:
                load_dir, tag = copy.parent, copy.name
        # DeepSpeed 0.19's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`)
        # gives every parameter group the hyperparameters of group 0, and every flat partition
        # one shared `step` tensor, which torch's AdamW then increments once per partition per
        # step: the no-decay group (norms, biases, gates) would be decayed and the bias
        # corrections would run ahead, a silent drift of the resumed run (3.6e-4 by 12 steps).
        # The groups' hyperparameters come from this run's config (only the lr is the
        # checkpoint's), and each partition gets its own step counter.
        hyperparameters = [{key: value for key, value in group.items() if key not in ("params", "lr")}
                           for group in engine.optimizer.param_groups]
        load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir / tag}")
        for group, own in zip(engine.optimizer.param_groups, hyperparameters):
            group.update(own)
        _separate_step_counters(getattr(engine.optimizer, "optimizer", engine.optimizer))
        own = info.path / f"rank{self.rank:05d}_state.pt"
        # Another world size: ranks without a file of their own take rank 0's RNG state.
        rank_state = torch.load(own if own.is_file() else info.path / "rank00000_state.pt", weights_only=False)
        set_rng_state(rank_state["rng"])
        return client_state
