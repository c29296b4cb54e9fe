"""The study file: a base recipe, the axes of a grid of runs, and settings derived per run.

A study file is YAML composed like a recipe (`base:` lists other study files, merged in order)
and checked against the structured schema below before anything runs; every error names the
study-file key. Example (`recipes/studies/tiny-cpu.yaml`):

    name: tiny-cpu
    recipe: tiny-mac-cpu                # the base recipe every run starts from
    overrides: {train.eval_batches: 4}  # run-config keys set for every run
    axes:
      widths: [32, 48, 64]              # sizes by rule: model.dim; depth/heads from `derived`
      flops: [1e12, 3e12, 1e13]         # compute budgets (our FLOP count): tokens = C / FLOPs per token
      variants:
        - {name: mac}
        - {name: transformer, overrides: {model.variant: transformer}}
    derived:                            # run-config key -> expression, in this order
      model.n_layers: "max(2, dim // 16)"
      train.warmup_steps: "max(1, steps // 10)"

Axes: exactly one of `sizes` (named sizes: explicit `dim`/`n_layers`/`n_heads`, or `recipe:` to
take another recipe's model section) and `widths`; exactly one of `tokens` (token budgets) and
`flops` (compute budgets); optional `variants` (named override sets) and `lr` (learning rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titans_train.config.errors import InvalidValueError
from titans_train.config.loading import check_unknown_keys, load_composed, resolve_recipe_path


@dataclass
class SizeConfig:
    # Label in run names; empty: the recipe's name, or d{dim}-l{n_layers}.
    name: str = ""
    # A recipe whose model section defines this size (instead of dim/n_layers/n_heads).
    recipe: str = ""
    dim: int = 0
    n_layers: int = 0
    n_heads: int = 0


@dataclass
class VariantConfig:
    name: str = ""
    # Run-config keys (dotted) set for this variant, e.g. {model.variant: transformer}.
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AxesConfig:
    sizes: List[SizeConfig] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    flops: List[float] = field(default_factory=list)
    variants: List[VariantConfig] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)


@dataclass
class StudyConfig:
    name: str = ""
    recipe: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)
    axes: AxesConfig = field(default_factory=AxesConfig)
    # Run-config key -> expression (titans_train.study.expressions), evaluated in file order.
    derived: Dict[str, str] = field(default_factory=dict)
    # Where the runs go (run i in <runs_dir>/<run name>). Empty: runs/studies/<name>.
    runs_dir: str = ""


FREE_FORM = ("overrides", "derived")  # keys checked against the run config, not this schema


def _check_keys(user: DictConfig) -> None:
    """Unknown keys anywhere in the study file, named with their full path."""
    schema = OmegaConf.structured(StudyConfig)
    shallow = OmegaConf.masked_copy(user, [k for k in user.keys() if k not in FREE_FORM])
    axes = shallow.get("axes")
    list_items = {"sizes": SizeConfig, "variants": VariantConfig}
    if isinstance(axes, DictConfig):
        shallow.axes = OmegaConf.masked_copy(axes, [k for k in axes.keys() if k not in list_items])
    check_unknown_keys(shallow, schema)
    if not isinstance(axes, DictConfig):
        return
    for axis, item_type in list_items.items():
        items = axes.get(axis)
        if items is None:
            continue
        if not isinstance(items, ListConfig):
            raise InvalidValueError(f"axes.{axis}", "must be a list")
        for index, item in enumerate(items):
            key = f"axes.{axis}[{index}]"
            if not isinstance(item, DictConfig):
                raise InvalidValueError(key, f"must be a mapping (e.g. {{name: ...}}), got {item!r}")
            free = [k for k in item.keys() if k != "overrides"]
            check_unknown_keys(OmegaConf.masked_copy(item, free), OmegaConf.structured(item_type), prefix=f"{key}.")


def _check_axes(study: StudyConfig, key_prefix: str = "axes") -> None:
    axes = study.axes
    for first, second, what in (("sizes", "widths", "model sizes"), ("tokens", "flops", "training budgets")):
        given = [name for name in (first, second) if len(getattr(axes, name))]
        if not given:
            raise InvalidValueError(f"{key_prefix}.{first}", f"the grid is empty: give {what} as "
                                                           f"{key_prefix}.{first} or {key_prefix}.{second} (a non-empty list)")
        if len(given) == 2:
            raise InvalidValueError(f"{key_prefix}.{second}", f"give {key_prefix}.{first} or {key_prefix}.{second}, not both")
    for name in ("widths", "tokens", "flops", "lr"):
        for index, value in enumerate(getattr(axes, name)):
            if value <= 0:
                raise InvalidValueError(f"{key_prefix}.{name}[{index}]", f"must be > 0, got {value}")
    for index, size in enumerate(axes.sizes):
        key = f"{key_prefix}.sizes[{index}]"
        if bool(size.recipe) == bool(size.dim):
            raise InvalidValueError(key, "give either recipe (a recipe's model section) or dim (and n_layers, n_heads)")
    for axis in ("sizes", "variants"):
        labels = [label for label, _ in axis_labels(study, axis)]
        for index, label in enumerate(labels):
            if not label:
                raise InvalidValueError(f"{key_prefix}.{axis}[{index}].name", "every entry needs a name")
            if labels.index(label) != index:
                raise InvalidValueError(f"{key_prefix}.{axis}[{index}].name", f"{label!r} is used twice")


def axis_labels(study: StudyConfig, axis: str) -> list[tuple[str, Any]]:
    """(label, entry) per entry of a size or variant axis, in file order."""
    if axis == "variants":
        return [(variant.name, variant) for variant in study.axes.variants]
    if study.axes.widths:
        return [(f"d{width}", width) for width in study.axes.widths]
    labels = []
    for size in study.axes.sizes:
        label = size.name or (Path(size.recipe).stem if size.recipe else f"d{size.dim}-l{size.n_layers}")
        labels.append((label, size))
    return labels


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    """The typed study of the YAML file at `path` (or a name under recipes/, e.g. studies/tiny-cpu),
    and the file's resolved path; raises ConfigError naming the study-file key at fault."""
    study_path = resolve_recipe_path(str(path))
    user = load_composed(study_path)
    _check_keys(user)
    if "name" not in user:
        user.name = study_path.stem
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), user)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "study"
        raise InvalidValueError(str(key), str(error).splitlines()[0]) from error
    study: StudyConfig = OmegaConf.to_object(merged)
    if not study.recipe:
        raise InvalidValueError("recipe", "name the base recipe every run starts from, e.g. recipe: tiny-mac-cpu")
    resolve_recipe_path(study.recipe, relative_to=study_path.parent)  # a missing recipe fails here
    _check_axes(study)
    if not study.runs_dir:
        study.runs_dir = str(Path("runs") / "studies" / study.name)
    return study, study_path
