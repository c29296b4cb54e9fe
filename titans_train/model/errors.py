"""Typed user errors of the model package: each message names the problem and the fix."""

from __future__ import annotations

from titans_train.errors import ConfigError as _ConfigError
from titans_train.errors import UserError


class ConfigError(_ConfigError):
    """A `TitansConfig` field has a value the model cannot be built with (key `model.<field>`)."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        self.key = f"model.{field}"
        self.reason = f"TitansConfig.{field}={value!r}: {problem}. Fix: {fix}."
        UserError.__init__(self, self.reason)


class InputIdsError(UserError, ValueError):
    """Token ids of the wrong type, shape or range."""


class StateMismatchError(UserError, ValueError):
    """A model or layer state that does not belong to this model, batch or position."""
