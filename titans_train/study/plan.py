"""Expand a study into its runs: the overrides of each, checked as a run config, with the
parameters, tokens and FLOPs it will use. Every run is validated before any starts.

Per run, overrides are applied in this order: the study's `overrides`, the size, the variant,
the lr, the derived `model.*` settings (names: the model section's numeric fields, `lr`), then
the budget (a compute budget C gives tokens = C / FLOPs per token), then the other derived
settings (names below), then the run's name, directory and wandb group.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from titans_train.config import ConfigError, InvalidValueError, batch_plan, load_recipe, model_config, to_container
from titans_train.config.loading import resolve_recipe_path
from titans_train.study.expressions import evaluate
from titans_train.study.spec import StudyConfig, axis_labels

# Names a non-model derived setting may use, besides the model section's numeric fields.
RUN_NAMES = ("params", "non_embedding_params", "flops_per_token", "tokens", "compute", "lr", "seq_len",
             "global_batch_tokens", "micro_batch_size", "steps")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    variant: str
    size: str
    budget: str
    lr: float
    recipe: str  # the base recipe's resolved path
    overrides: tuple[str, ...]  # key=value, as given to `titans-train train RECIPE ...`
    run_dir: str
    params: int
    non_embedding_params: int
    seq_len: int
    steps: int
    tokens: int  # trained: steps x global batch tokens
    flops_per_token: float  # titans_train.model.flops: matmuls, memory updates included
    flops: float  # tokens x flops_per_token
    compute_budget: float  # the axis value C (our FLOP count); 0 for token budgets

    def record(self) -> dict[str, Any]:
        return asdict(self)


def override(key: str, value: Any) -> str:
    """`key=value` with the value in a form the override parser reads back unchanged."""
    return f"{key}={json.dumps(value)}"


def parameter_counts(titans_config) -> tuple[int, int]:
    """(total, non-embedding) unique parameters; non-embedding leaves out the token embedding and
    an untied LM head (Kaplan et al. 2020's N)."""
    from titans_train.model.cli import count_parameters

    counts = count_parameters(titans_config)
    return counts["total"], counts["total"] - counts.get("embedding", 0) - counts.get("lm_head", 0)


def _budget_label(tokens: int | None, compute: float | None) -> str:
    if compute:
        mantissa, exponent = f"{compute:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"c{mantissa}e{int(exponent)}"
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= scale:
            return f"t{tokens / scale:g}{unit}"
    return f"t{tokens}"


def _model_names(config: DictConfig) -> dict[str, float]:
    return {k: v for k, v in to_container(config.model).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _size_overrides(label: str, entry: Any, key: str) -> list[str]:
    if isinstance(entry, int):  # axes.widths
        return [override("model.dim", entry)]
    if entry.recipe:
        try:
            sized = load_recipe(entry.recipe, world_size=None)
        except ConfigError as error:
            raise InvalidValueError(f"{key}.recipe", str(error)) from error
        return [override(f"model.{k}", v) for k, v in to_container(sized.model).items()]
    return [override(f"model.{name}", getattr(entry, name)) for name in ("dim", "n_layers", "n_heads") if getattr(entry, name)]


class _RunBuilder:
    """Builds one run; `load` checks the overrides so far, naming the study key that set a bad one."""

    def __init__(self, study: StudyConfig, recipe: str, name: str):
        self.study, self.recipe, self.name = study, recipe, name
        self.overrides: list[str] = []
        self.source: dict[str, str] = {}  # run-config key -> the study-file key that set it

    def add(self, source: str, items: list[str]) -> None:
        for item in items:
            self.overrides.append(item)
            self.source[item.split("=", 1)[0]] = source

    def load(self, world_size: int | None) -> DictConfig:
        try:
            return load_recipe(self.recipe, self.overrides, world_size=world_size)
        except ConfigError as error:
            source = self.source.get(error.key)
            if source is None or source.endswith(error.key):
                key = source or error.key
            elif source.endswith("overrides"):
                key = f"{source}.{error.key}"
            else:
                key = f"{source} -> {error.key}"
            raise InvalidValueError(key, f"run {self.name}: {str(error).split(': ', 1)[-1]}") from error

    def derive(self, keys: list[str], names: dict[str, float]) -> None:
        for key in keys:
            value = evaluate(f"derived.{key}", self.study.derived[key], names)
            self.add(f"derived.{key}", [override(key, value)])
            names[key.rsplit(".", 1)[-1]] = value
            if key == "train.global_batch_tokens":
                names["steps"] = math.ceil(names["tokens"] / value)


def plan_study(study: StudyConfig, study_path: Path, runs_dir: str | None = None) -> list[PlannedRun]:
    """Every run of the grid (sizes x budgets x variants x lrs, in that nesting), validated."""
    from titans_train.model.flops import flops_per_token

    recipe = str(resolve_recipe_path(study.recipe, relative_to=study_path.parent).resolve())
    root = Path(runs_dir or study.runs_dir)
    variants = axis_labels(study, "variants") or [("", None)]
    budgets = [(int(t), None) for t in study.axes.tokens] + [(None, float(c)) for c in study.axes.flops]
    lrs = list(study.axes.lr) or [None]
    model_keys = [k for k in study.derived if k.startswith("model.")]
    other_keys = [k for k in study.derived if not k.startswith("model.")]
    runs = []
    for size_index, (size, size_entry) in enumerate(axis_labels(study, "sizes")):
        size_key = f"axes.widths[{size_index}]" if study.axes.widths else f"axes.sizes[{size_index}]"
        for tokens, compute in budgets:
            budget = _budget_label(tokens, compute)
            for variant, variant_entry in variants:
                for lr in lrs:
                    name = "-".join(p for p in (variant, size, budget, f"lr{lr:g}" if lr else "") if p)
                    run = _RunBuilder(study, recipe, name)
                    run.add("overrides", [override(k, v) for k, v in study.overrides.items()])
                    run.add(size_key, _size_overrides(size, size_entry, size_key))
                    if variant_entry is not None:
                        run.add(f"axes.variants[{variants.index((variant, variant_entry))}].overrides",
                                [override(k, v) for k, v in variant_entry.overrides.items()])
                    if lr:
                        run.add("axes.lr", [override("train.lr", lr)])
                    sized = run.load(None)
                    names = {**_model_names(sized), "lr": sized.train.lr}
                    run.derive(model_keys, names)
                    config = run.load(None)
                    titans = model_config(config)
                    params, non_embedding = parameter_counts(titans)
                    per_token = float(flops_per_token(titans, config.train.seq_len))
                    budget_key = "axes.flops" if compute else "axes.tokens"
                    wanted = tokens if tokens else max(1, math.floor(compute / per_token))
                    run.add(budget_key, [override("train.tokens", wanted), override("train.steps", 0)])
                    train = config.train
                    names.update(_model_names(config), params=params, non_embedding_params=non_embedding,
                                 flops_per_token=per_token, tokens=wanted, compute=compute or 0.0, lr=train.lr,
                                 seq_len=train.seq_len, global_batch_tokens=train.global_batch_tokens,
                                 micro_batch_size=train.micro_batch_size,
                                 steps=math.ceil(wanted / train.global_batch_tokens))
                    run.derive(other_keys, names)
                    run_dir = root / name
                    run.add("study", [override("name", name), override("run_dir", str(run_dir)),
                                      override("logging.wandb_group", study.name),
                                      override("logging.wandb_name", f"{study.name}/{name}")])
                    config = run.load(1)
                    steps = batch_plan(config, 1).total_steps
                    trained = steps * config.train.global_batch_tokens
                    runs.append(PlannedRun(
                        name=name, variant=variant or str(config.model.variant), size=size, budget=budget,
                        lr=float(config.train.lr), recipe=recipe, overrides=tuple(run.overrides),
                        run_dir=str(run_dir), params=params, non_embedding_params=non_embedding,
                        seq_len=int(config.train.seq_len), steps=steps, tokens=trained,
                        flops_per_token=per_token, flops=per_token * trained, compute_budget=compute or 0.0,
                    ))
    return runs
