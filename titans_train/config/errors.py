"""The config errors, all `titans_train.errors.ConfigError`: each names the offending key."""

from __future__ import annotations

import difflib
from typing import Iterable

from titans_train.errors import ConfigError


class UnknownKeyError(ConfigError):
    def __init__(self, key: str, candidates: Iterable[str] = ()):
        self.suggestions = list(candidates)
        hint = f"; did you mean {' or '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(key, f"unknown key{hint}")


class InvalidValueError(ConfigError):
    pass


class BatchArithmeticError(ConfigError):
    pass


class RecipeNotFoundError(ConfigError):
    pass


def closest(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        near = closest(str(value), choices)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InvalidValueError(key, f"{value!r} is not one of {', '.join(choices)}{hint}")
