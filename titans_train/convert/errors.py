"""The conversion tool's user error: one line naming the path at fault and the fix."""

from __future__ import annotations

from pathlib import Path

from titans_train.errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint, output directory or tokenizer conversion cannot use as given (the CLI
    prints it on one line and exits 2)."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}. Fix: {fix}.")
