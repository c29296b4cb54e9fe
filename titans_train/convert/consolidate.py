"""One full state dict from any training checkpoint this project writes.

A checkpoint (see `titans_train.train.checkpoint`) holds, per tensor-parallel rank m:

  ZeRO 0      mp_rank_{m:02d}_model_states.pt: the module's weights (the training dtype)
  ZeRO 1, 2   the same file (module weights, parameter shapes) plus one
              [bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt per ZeRO rank d: the fp32
              master weights as flat partitions, next to the optimizer moments
  ZeRO 3      zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt (shapes only) and the optim files

ZeRO's ranks are dp x sp, or dp alone for ZeRO-3 under sp (`parallel/zero.py`: then only sp
rank 0 writes them); the files say how many there are, so no layout arithmetic is needed here.

For ZeRO >= 1 the fp32 master weights are read with DeepSpeed's own `zero_to_fp32` routines, one
tp rank at a time; they open every optim file memory-mapped and drop the optimizer moments before
touching them, so the moments are never read into memory. Then the tp shards are joined by
`TP_PLAN` (`tp_layout.py`). Nothing is written into the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from titans_train.convert.errors import ConversionError
from titans_train.convert.tp_layout import merge_tensor_parallel
from titans_train.train.checkpoint import (
    LATEST,
    MANIFEST,
    PARTIAL_PREFIX,
    TAG_PATTERN,
    CheckpointManager,
    verify_checkpoint,
)

TRAINER_PREFIX = "model."  # LanguageModelObjective / ParallelObjective hold the TitansLM as `.model`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECKPOINT_FIX = "pass a checkpoint directory (stepNNNNNNNNN with titans_checkpoint.json), its checkpoints directory or the run directory"


@dataclass
class ConsolidatedModel:
    """Full weights of a `TitansLM`, by parameter path (a tied LM head appears once, as
    `embedding.weight`), with what is needed to rebuild and describe the model."""

    checkpoint: Path
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def run_config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def model_config(self):
        from titans_train.model import TitansConfig

        return TitansConfig.from_dict(dict(self.run_config["model"]))


def _verified(path: Path) -> dict[str, Any]:
    manifest, reason = verify_checkpoint(path)  # sizes and content digests
    if manifest is None:
        previous = _previous_complete(path)
        fix = f"convert the previous complete checkpoint {previous}" if previous else "convert another, complete checkpoint"
        raise ConversionError(path, f"damaged checkpoint ({reason})", fix)
    return manifest


def _previous_complete(path: Path) -> Path | None:
    manager = CheckpointManager(path.parent, keep_last=1, rank=0, world_size=1)
    older = [info for info in manager.complete_checkpoints() if info.path != path]
    return older[-1].path if older else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(tag directory, verified manifest) from a tag dir, a checkpoints dir (`latest`) or a run dir.

    Unlike resuming, conversion never falls back silently: a damaged checkpoint is an error that
    names the previous complete one.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(path, "does not exist or is not a directory", CHECKPOINT_FIX)
    if path.name.startswith(PARTIAL_PREFIX):
        raise ConversionError(path, "a save that did not finish (a .partial- directory)",
                              f"convert a complete checkpoint next to it, such as {_previous_complete(path) or 'another one'}")
    if (path / MANIFEST).is_file() or TAG_PATTERN.match(path.name):
        return path, _verified(path)
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (root / tag).is_dir():
                raise ConversionError(latest, f"names {tag!r}, which does not exist", "pass one checkpoint directory explicitly")
            return root / tag, _verified(root / tag)
    raise ConversionError(path, f"is not a training checkpoint (no {MANIFEST}, no `{LATEST}`)", CHECKPOINT_FIX)


def _torch_load(file: Path, mmap: bool = False) -> Any:
    """torch.load with a one-line error for a missing or damaged file (mmap: open without reading)."""
    if not file.is_file():
        raise ConversionError(file, "is missing", "the checkpoint is incomplete: convert another one")
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:  # torch raises many kinds for a damaged pickle/zip
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(file, f"cannot be read ({type(error).__name__}: {first_line})",
                              "the shard is damaged: convert the previous complete checkpoint, or copy "
                              "the file again") from None


def _checked(files: list[Path], checkpoint: Path, what: str) -> list[Path]:
    if not files:
        raise ConversionError(checkpoint, f"has no {what}", "the checkpoint is incomplete: convert another one")
    return files


def _rank_files(checkpoint: Path, pattern: str) -> list[Path]:
    def zero_rank(file: Path) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", file.name).group(1))

    return sorted(checkpoint.glob(pattern), key=zero_rank)


ZERO_STATES = ("fp32", "exp_avg", "exp_avg_sq")  # what ZeRO keeps per parameter: master weights, Adam's moments


def _flat_groups(optimizer_state: dict[str, Any], zero_stage: int, state: str) -> list[torch.Tensor]:
    """One ZeRO rank's flat partitions of `state`, one per parameter group (ZeRO-3: sub-group)."""
    if state == "fp32":
        return optimizer_state["fp32_flat_groups" if zero_stage == 3 else "single_partition_of_fp32_groups"]
    base = optimizer_state["optimizer_state_dict" if zero_stage == 3 else "base_optimizer_state"]["state"]
    return [base[index][state] for index in range(len(base))]


def read_tp_rank_state(checkpoint: Path, mp_rank: int, zero_stage: int,
                       state: str = "fp32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One state (`ZERO_STATES`) of one tp rank from ZeRO 1-3 shards, at that rank's shard shapes,
    by DeepSpeed parameter name (zero_to_fp32's merge over the ZeRO partitions); and ZeRO rank 0's
    optimizer state (memory-mapped: only the pages of `state` are read)."""
    from titans_train.train.distributed import prepare_deepspeed_environment

    prepare_deepspeed_environment()  # else importing deepspeed prints its accelerator warning on stdout
    from deepspeed.utils import zero_to_fp32

    suffix = f"mp_rank_{mp_rank:02d}"
    if zero_stage == 3:
        model_files = _rank_files(checkpoint, f"zero_pp_rank_*_{suffix}_model_states.pt")
    else:
        model_files = [checkpoint / f"{suffix}_model_states.pt"]
    optim_files = _rank_files(checkpoint, f"*zero_pp_rank_*_{suffix}_optim_states.pt")
    _checked(optim_files, checkpoint, f"ZeRO optimizer shards for tp rank {mp_rank}")
    for file in model_files:  # DeepSpeed's readers fail with long tracebacks
        _torch_load(file, mmap=True)
    optimizer_states = [_torch_load(file, mmap=True)["optimizer_state_dict"] for file in optim_files]
    first = optimizer_states[0]
    world = first["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(optim_files):
        raise ConversionError(checkpoint, f"has {len(optim_files)} ZeRO optimizer shards for tp rank {mp_rank}, "
                              f"its ZeRO partition count is {world}", "the checkpoint is incomplete: use another one")
    flat_groups = [_flat_groups(optimizer_state, zero_stage, state) for optimizer_state in optimizer_states]
    quiet = io.StringIO()  # it reports progress on stdout and stderr
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        model_states = zero_to_fp32.parse_model_states([str(f) for f in model_files])
        if zero_stage <= 2:
            merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat_groups, model_states, False, first.get("param_alignment_paddings"))
        else:
            merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False)
    return zero_to_fp32.to_torch_tensor(merged), first


def read_tp_rank_weights(checkpoint: Path, manifest: dict[str, Any], mp_rank: int) -> dict[str, torch.Tensor]:
    """The weights one tp rank holds (its shards), by TitansLM parameter path: the fp32 master
    copy where ZeRO keeps one, else the module's weights in the training dtype."""
    zero_stage = int(manifest["zero_stage"])
    if zero_stage == 0:
        file = checkpoint / f"mp_rank_{mp_rank:02d}_model_states.pt"
        state = _torch_load(file, mmap=True)["module"]  # its optimizer state stays unread
    else:
        state, _ = read_tp_rank_state(checkpoint, mp_rank, zero_stage)
    return {name.removeprefix(TRAINER_PREFIX): value for name, value in state.items()
            if isinstance(value, torch.Tensor)}


def consolidate(path: str | Path, dtype: str | None = "fp32") -> ConsolidatedModel:
    """Full weights of the checkpoint at `path` (tag dir, checkpoints dir or run dir).

    `dtype`: "fp32" or "bf16" (cast at the end), or None for the dtype the weights were read in.
    Peak memory: one tp rank's weights as read, plus the full weights being assembled.
    """
    checkpoint, manifest = resolve_checkpoint(path)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(checkpoint, f"unknown dtype {dtype!r}", f"use one of {sorted(DTYPES)}")
    config = manifest["config"]
    tp = int(config["parallel"]["tp"])
    tied = config["model"].get("tie_embeddings", True)
    shards = []
    for rank in range(tp):
        shard = read_tp_rank_weights(checkpoint, manifest, rank)
        if tied:  # listed under both names by some ranks' files, stored once
            shard.pop("lm_head.weight", None)
        shards.append(shard)
    state = merge_tensor_parallel(shards, int(config["model"]["vocab_size"]))
    if dtype is not None:
        state = {name: value.to(DTYPES[dtype]).contiguous() for name, value in state.items()}
    return ConsolidatedModel(checkpoint, manifest, state)


def load_titans_model(consolidated: ConsolidatedModel):
    """A `TitansLM` (eval mode) holding the consolidated weights; every parameter must match."""
    from titans_train.model import TitansLM

    model = TitansLM(consolidated.model_config())
    load_full_state(model, consolidated.state, consolidated.checkpoint)
    return model.eval()


def load_full_state(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy full weights into a plain `TitansLM`; missing or unexpected names are an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ConversionError(source, f"weights do not match the model (missing {missing}, unexpected {unexpected})",
                              "convert a checkpoint written by this version of titans-train")
