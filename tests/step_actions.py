"""A test's intervention at one step of a real training run, as a trainer callback."""

from __future__ import annotations

from typing import Callable

from titans_train.train.callbacks import Callback


class AtStep(Callback):
    """Runs `action(trainer)` right after optimizer step `step`, before the default callbacks."""

    def __init__(self, step: int, action: Callable[[object], None]):
        self.step = step
        self.action = action

    def on_step_end(self, trainer, metrics) -> None:
        if metrics.step == self.step:
            self.action(trainer)
