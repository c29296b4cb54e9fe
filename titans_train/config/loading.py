"""Recipes: YAML files composed from parts, overridden by `key=value`, checked against the schema.

A recipe may list parts under `base:` (names relative to the recipes folder, or paths relative to
the recipe file); they are merged in order, then the recipe's own keys, then the command-line
overrides. The result is checked for unknown keys (with the nearest valid key named), merged
into the typed schema (type errors name the key), completed (derived paths), given the keys a
prepared dataset decides (`titans_train.config.dataset_defaults`) and validated
(`titans_train.config.validate`), all before any model or process group exists.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from titans_train.config.errors import InvalidValueError, RecipeNotFoundError, UnknownKeyError, closest
from titans_train.config.schema import RunConfig

BASE_KEY = "base"


def recipes_root() -> Path:
    """The installed recipes folder (package data `titans_train.recipes`)."""
    return Path(str(importlib.resources.files("titans_train.recipes")))


def list_recipes() -> list[str]:
    root = recipes_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*.yaml"))


def resolve_recipe_path(recipe: str, relative_to: Path | None = None) -> Path:
    """A recipe name (`tiny-mac-cpu`, `parts/model/170m`) or a path to a YAML file."""
    candidates = []
    as_path = Path(recipe)
    if relative_to is not None:
        candidates.append(relative_to / as_path)
    candidates.append(as_path)
    name = recipe[: -len(".yaml")] if recipe.endswith(".yaml") else recipe
    candidates.append(recipes_root() / f"{name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    near = closest(name, list_recipes(), n=3)
    hint = f"; did you mean {' or '.join(near)}?" if near else "; `titans-train config list` shows them"
    raise RecipeNotFoundError("recipe", f"no recipe or file named {recipe!r}{hint}")


def load_composed(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its `base:` parts merged in, unchecked (recipes, and study files)."""
    path = Path(path).resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in chain + (path,))
        raise InvalidValueError(BASE_KEY, f"recipe parts include each other: {cycle}")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come in several types
        raise InvalidValueError("recipe", f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, DictConfig):
        raise InvalidValueError("recipe", f"{path} must hold a mapping at the top level")
    bases = raw.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        base_path = resolve_recipe_path(str(base), relative_to=path.parent)
        part = load_composed(base_path, chain + (path,))
        part.pop("name", None)  # a run is named by its own recipe, not by the parts it includes
        merged = OmegaConf.merge(merged, part)
    return OmegaConf.merge(merged, raw)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise InvalidValueError(item, "overrides are written key=value, e.g. train.lr=3e-4")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise InvalidValueError(str(overrides), f"cannot parse override: {error}") from error


def model_schema() -> DictConfig:
    from titans_train.model import TitansConfig

    return OmegaConf.structured(TitansConfig)


def build_schema() -> DictConfig:
    schema = OmegaConf.structured(RunConfig)
    schema.model = model_schema()
    return schema


def _leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    paths = []
    for key in node.keys():
        value = node._get_node(key)
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, DictConfig):
            paths += _leaf_paths(value, f"{path}.")
    return paths


def check_unknown_keys(user: DictConfig, schema: DictConfig, prefix: str = "", all_paths: list[str] | None = None) -> None:
    """Raise UnknownKeyError for the first key of `user` absent from `schema`, nearest key named."""
    all_paths = _leaf_paths(schema) if all_paths is None else all_paths
    for key in user.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            siblings = [f"{prefix}{k}" for k in schema.keys()]
            near = closest(path, siblings)
            if not near:  # perhaps the right key in the wrong section (`lr` for `train.lr`)
                near = [p for p in all_paths if p.rsplit(".", 1)[-1] == str(key)][:2] or closest(path, all_paths)
            raise UnknownKeyError(path, near)
        user_value = user._get_node(key)
        schema_value = schema._get_node(key)
        if isinstance(user_value, DictConfig) and isinstance(schema_value, DictConfig):
            check_unknown_keys(user_value, schema_value, f"{path}.", all_paths)
        elif isinstance(user_value, DictConfig) and not isinstance(schema_value, (DictConfig, ListConfig)):
            if schema_value is not None and not schema_value._is_none():
                raise InvalidValueError(path, "expected a single value, got a mapping")


def _apply_to_schema(user: DictConfig) -> DictConfig:
    schema = build_schema()
    check_unknown_keys(user, schema)
    try:
        return OmegaConf.merge(schema, user)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        raise InvalidValueError(str(key), str(error).splitlines()[0]) from error


def complete(config: DictConfig) -> None:
    """Fill the fields whose defaults derive from others (run_dir, checkpoint.dir, wandb name)."""
    if not config.run_dir:
        config.run_dir = str(Path("runs") / config.name)
    if not config.checkpoint.dir:
        config.checkpoint.dir = str(Path(config.run_dir) / "checkpoints")
    if not config.logging.wandb_name:
        config.logging.wandb_name = config.name


def load_recipe(recipe: str, overrides: Iterable[str] = (), world_size: int | None = 1) -> DictConfig:
    """The resolved, validated config of `recipe` with `overrides` (key=value) applied.

    `world_size` is the number of processes the run will use, for the batch arithmetic; None
    skips the checks that depend on it.
    """
    from titans_train.config.validate import validate

    from titans_train.config.dataset_defaults import apply_dataset_manifest

    user = load_composed(resolve_recipe_path(recipe))
    explicit = parse_overrides(list(overrides))
    user = OmegaConf.merge(user, explicit)
    if "name" not in user:
        user.name = Path(recipe).stem if recipe.endswith(".yaml") else Path(recipe).name
    config = _apply_to_schema(user)
    complete(config)
    apply_dataset_manifest(config, explicit)
    validate(config, world_size=world_size)
    OmegaConf.set_readonly(config, True)
    return config


def config_from_container(container: dict[str, Any], world_size: int | None = None) -> DictConfig:
    """Rebuild a typed config from a resolved one stored as plain data (checkpoints, run dirs)."""
    from titans_train.config.validate import validate

    config = _apply_to_schema(OmegaConf.create(container))
    complete(config)
    validate(config, world_size=world_size)
    OmegaConf.set_readonly(config, True)
    return config


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)


def to_container(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)


__all__ = [
    "build_schema",
    "config_from_container",
    "list_recipes",
    "load_composed",
    "load_recipe",
    "recipes_root",
    "resolve_recipe_path",
    "to_container",
    "to_yaml",
]
