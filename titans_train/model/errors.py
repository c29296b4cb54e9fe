"""Typed user errors of the model package: each message names the problem and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A `TitansConfig` field has a value the model cannot be built with."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        super().__init__(f"TitansConfig.{field}={value!r}: {problem}. Fix: {fix}.")


class InputIdsError(ValueError):
    """Token ids of the wrong type, shape or range."""


class StateMismatchError(ValueError):
    """A model or layer state that does not belong to this model, batch or position."""
