"""The conversion tool's user error: one line naming the path at fault and the fix."""

from __future__ import annotations

from pathlib import Path


class ConversionError(ValueError):
    """A checkpoint, output directory or tokenizer conversion cannot use as given."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}. Fix: {fix}.")
