"""What may change between a checkpoint's run and the run resuming it.

The manifest of every checkpoint holds the resolved config of the run that wrote it. A resume
compares it with the config of this run, key by key (dotted paths of the leaves): a difference
in any key not in `SAFE_TO_CHANGE` would make the resumed run something other than what its
checkpoint, its `config.yaml` and its logs claim (another lr, another model, other data), so it
is refused before anything is built, with every difference listed and the fix. docs/training.md
("Resuming with a changed config") documents the list.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from titans_train.config.loading import build_schema
from titans_train.errors import UserError

# Dotted keys, or prefixes ending in ".*", that a resumed run may change.
SAFE_TO_CHANGE = (
    # Where the run lives (the checkpoint found there is what is resumed).
    "name", "run_dir", "checkpoint.dir",
    # Its length: the lr schedule is recomputed for the new total at the resumed step.
    "train.steps", "train.tokens",
    # When to evaluate, log and save.
    "train.eval_interval", "train.eval_batches", "train.eval_tasks", "train.eval_lengths", "checkpoint.interval", "checkpoint.keep_last",
    "checkpoint.save_final", "checkpoint.auto_resume", "logging.*",
    # The layout: the same optimisation problem on other processes (resume across layouts is the
    # checkpoint loader's job: universal copies, or a clear refusal where it cannot).
    "parallel.tp", "parallel.sp", "parallel.zero_stage", "parallel.tp_sequence_sharding", "parallel.sp_schedule",
    "parallel.activation_checkpointing", "parallel.backend", "parallel.timeout_s", "parallel.zero_bucket_elements",
    "train.micro_batch_size",
    # How data is read, not which data.
    "data.num_workers", "data.cache_dir", "data.verify",
    # Only used by a fresh start: a resumable checkpoint takes precedence.
    "train.init_from",
)

ABSENT = "(absent)"


class ConfigChangedOnResume(UserError):
    pass


def is_safe_to_change(key: str) -> bool:
    return any(key == safe or (safe.endswith(".*") and key.startswith(safe[:-1])) for safe in SAFE_TO_CHANGE)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        leaves.update(_leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return leaves


def config_differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """"key: old -> new" for every leaf that differs and is not safe to change, sorted by key.

    A key on one side only (a setting a newer version added) is no difference when the other side
    holds its default from `defaults`: the older run behaved as that default does."""
    old_leaves, new_leaves = _leaves(old), _leaves(new)
    default_leaves = _leaves(defaults or {})
    differences = []
    for key in sorted(old_leaves.keys() | new_leaves.keys()):
        before = old_leaves.get(key, default_leaves.get(key, ABSENT))
        after = new_leaves.get(key, default_leaves.get(key, ABSENT))
        if before != after and not is_safe_to_change(key):
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


def check_resumable(checkpoint_config: dict[str, Any], config: dict[str, Any], checkpoint: str) -> None:
    """Raise `ConfigChangedOnResume` if `config` differs from the checkpoint's run beyond `SAFE_TO_CHANGE`."""
    defaults = OmegaConf.to_container(build_schema(), resolve=False, throw_on_missing=False)
    differences = config_differences(checkpoint_config, config, defaults)
    if differences:
        raise ConfigChangedOnResume(
            f"the config differs from that of the run that wrote {checkpoint} ({'; '.join(differences)}); "
            "resuming would train another run under this one's name. Undo the change to resume it, or give the "
            "new run its own directory (name=... or run_dir=...), or start it afresh here with "
            "checkpoint.auto_resume=false")
