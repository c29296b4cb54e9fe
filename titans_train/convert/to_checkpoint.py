"""Full weights as a one-file training checkpoint directory (tp 1, ZeRO 0 file layout).

OUT/latest and OUT/stepNNNNNNNNN/{mp_rank_00_model_states.pt, titans_checkpoint.json}: what
`consolidate`, `titans-train generate --checkpoint OUT`, `titans-train convert OUT ... --to hf`
and `train.init_from=OUT` read. It holds weights only (no optimizer, scheduler or data-loader
state), so it starts runs (`train.init_from`) rather than resuming one.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from titans_train.convert.consolidate import TRAINER_PREFIX
from titans_train.convert.output import atomic_directory
from titans_train.train.checkpoint import DIGEST_ALGORITHM, FORMAT_VERSION, LATEST, MANIFEST, tag_for_step
from titans_train.train.file_digest import file_digest

MODEL_FILE = "mp_rank_00_model_states.pt"


def write_checkpoint(weights: dict[str, torch.Tensor], run_config: dict[str, Any], out: str | Path,
                     step: int = 0, tokens_seen: int = 0, source: str = "", overwrite: bool = False,
                     sources: tuple[Path, ...] = ()) -> Path:
    """Write `weights` (TitansLM paths, full) as the checkpoint directory `out`; returns the tag dir."""
    out = Path(out)
    config = copy.deepcopy(run_config)
    config["parallel"].update(tp=1, sp=1, zero_stage=0)  # the layout of the files written here
    tag = tag_for_step(step)
    with atomic_directory(out, overwrite, sources) as temporary:
        directory = temporary / tag
        directory.mkdir()
        module = {TRAINER_PREFIX + name: value.contiguous() for name, value in weights.items()}
        torch.save({"module": module, "titans_config": config}, directory / MODEL_FILE)
        manifest = {"format": FORMAT_VERSION, "tag": tag, "step": step, "time": time.time(), "world_size": 1,
                    "files": {MODEL_FILE: (directory / MODEL_FILE).stat().st_size}, "tokens_seen": tokens_seen,
                    "digest_algorithm": DIGEST_ALGORITHM, "digests": {MODEL_FILE: file_digest(directory / MODEL_FILE)},
                    "data_parallel_size": 1, "zero_stage": 0, "config": config, "converted_from": source}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        (temporary / LATEST).write_text(tag + "\n")
    return out / tag
