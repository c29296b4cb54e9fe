"""Titans language models: the neural memory, the LMM/MAC/MAG/MAL mixers and the baselines."""

from .config import VARIANTS, TitansConfig
from .errors import ConfigError, InputIdsError, StateMismatchError
from .model import ModelOutput, ModelState, TitansBlock, TitansLM, no_weight_decay

__all__ = [
    "VARIANTS",
    "ConfigError",
    "InputIdsError",
    "ModelOutput",
    "ModelState",
    "StateMismatchError",
    "TitansBlock",
    "TitansConfig",
    "TitansLM",
    "no_weight_decay",
]
