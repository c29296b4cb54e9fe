"""The evaluation command's user error: one line naming the option at fault and the fix."""

from __future__ import annotations

from titans_train.errors import UserError


class EvalOptionError(UserError, ValueError):
    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


class SourceError(UserError, ValueError):
    """SOURCE is not something a model can be loaded from."""

    def __init__(self, source, problem: str):
        super().__init__(f"SOURCE {source}: {problem}; pass a run directory, a checkpoint directory or a "
                         "directory written by `titans-train convert ... --to hf`")
