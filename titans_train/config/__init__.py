"""Typed run configs (omegaconf structured dataclasses), recipe loading and validation."""

from titans_train.config.errors import (
    BatchArithmeticError,
    ConfigError,
    InvalidValueError,
    RecipeNotFoundError,
    UnknownKeyError,
)
from titans_train.config.loading import (
    config_from_container,
    list_recipes,
    load_recipe,
    recipes_root,
    resolve_recipe_path,
    to_container,
    to_yaml,
)
from titans_train.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from titans_train.config.validate import BatchPlan, batch_plan, model_config, validate

__all__ = [
    "BatchArithmeticError",
    "BatchPlan",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "InvalidValueError",
    "LoggingConfig",
    "ParallelConfig",
    "RecipeNotFoundError",
    "RunConfig",
    "TrainConfig",
    "UnknownKeyError",
    "batch_plan",
    "config_from_container",
    "list_recipes",
    "load_recipe",
    "model_config",
    "recipes_root",
    "resolve_recipe_path",
    "to_container",
    "to_yaml",
    "validate",
]
