"""The side concerns of the training loop, each one small class (OLMo-core's habit).

The loop (`Trainer._run`) only does lr -> optimizer step -> callbacks. Each callback sees the
trainer and the step's `StepMetrics`; one that wants the run to end calls `trainer.request_stop`.
They run in the order of `default_callbacks`, which matters:

1. `DivergenceStop`: a non-finite loss stops the run without saving (exit 3), before anything
   else can log, evaluate or checkpoint a diverged model;
2. `SignalStop`: SIGTERM/SIGUSR1 set a flag; all ranks agree on it (an all-reduce) and stop
   with a checkpoint (exit 75, for requeueing);
3. `ProgressLog`: the progress line and `train/*` metrics (loss, lr, gradient norm, tokens/s,
   MFU) every `logging.interval` steps, at the last step and when stopping;
4. `TelemetryLog`: per-layer memory statistics every `logging.telemetry_interval` steps;
5. `Evaluation`: validation loss (and `train.eval_tasks`) at the start, every
   `train.eval_interval` steps, at the end;
6. `Checkpointing`: every `checkpoint.interval` steps, on a stop that asks for it, at the end;
   a checkpoint becomes `latest` only after a finite loss has seen its weights.

Collective work (evaluation, telemetry, saving, the stop agreement) runs on every rank; only
what is logged differs (rank 0 logs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from titans_train.errors import EXIT_DIVERGED, EXIT_REQUEUE
from titans_train.train import stop_signals
from titans_train.train.distributed import all_reduce_max_flag
from titans_train.train.logging import ProgressMeter, progress_line

if TYPE_CHECKING:
    from titans_train.train.trainer import Trainer


@dataclass(frozen=True)
class StepMetrics:
    step: int  # optimizer steps done, this one included
    loss: float  # global mean training loss of the step
    lr: float  # the learning rate the step used
    grad_norm: float | None  # pre-clipping global gradient norm


@dataclass(frozen=True)
class StopRequest:
    exit_code: int
    save: bool  # checkpoint before exiting
    reason: str


class Callback:
    """Every hook is optional. `on_train_end` runs only when all steps were taken."""

    def setup(self, trainer: Trainer) -> None:
        """Before the model and data are built."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def close(self) -> None:
        """Always called last, also after an exception."""


def divergence_stop(what: str, loss: float, step: int) -> StopRequest:
    """Stop as diverged (exit 3) without saving: a non-finite `what` ("loss", "validation loss")."""
    return StopRequest(
        EXIT_DIVERGED, save=False,
        reason=f"{what} is {loss} at step {step}: stopping without saving; the last checkpoint predates the "
               "divergence (lower train.lr or model.theta_max, or bound the memory's update with "
               "model.surprise_bound: docs/training.md)")


class DivergenceStop(Callback):
    def on_step_end(self, trainer, metrics):
        if not math.isfinite(metrics.loss):  # the same on every rank: the loss is a global mean
            trainer.request_stop(divergence_stop("loss", metrics.loss, metrics.step))


class SignalStop(Callback):
    """Stop with a checkpoint on SIGTERM / SIGUSR1, agreed by every rank at the end of a step.

    The signals are recorded by `stop_signals` from the start of the process (the CLI, then the
    `Trainer`, catch them); one received before the first step stops the run there
    (`Trainer._stop_if_signalled`)."""

    def on_step_end(self, trainer, metrics):
        if trainer.stop is not None:
            return
        if all_reduce_max_flag(stop_signals.received() is not None):
            trainer.request_stop(StopRequest(EXIT_REQUEUE, save=True,
                                             reason=f"stop requested ({stop_signals.description()}); saving at step {metrics.step}"))

    def close(self):
        stop_signals.release()


class ProgressLog(Callback):
    def on_train_start(self, trainer):
        batch = trainer.batch
        self.meter = ProgressMeter(batch.total_steps, batch.tokens_per_step, trainer.flops_per_token,
                                   trainer.config.logging.peak_flops_per_device * trainer.context.layout.world_size)
        self.meter.start(trainer.step)

    def on_step_end(self, trainer, metrics):
        total = trainer.batch.total_steps
        if metrics.step % trainer.config.logging.interval and metrics.step != total and trainer.stop is None:
            return
        speed = self.meter.measure(metrics.step)
        trainer.logger.info(progress_line(metrics.step, total, trainer.tokens_seen, metrics.loss, metrics.lr,
                                          metrics.grad_norm, speed))
        values = {"train/loss": metrics.loss, "train/lr": metrics.lr, "train/tokens": trainer.tokens_seen, **speed}
        if metrics.grad_norm is not None:
            values["train/grad_norm"] = metrics.grad_norm
        trainer.logger.metrics(metrics.step, values)


class TelemetryLog(Callback):
    def on_step_end(self, trainer, metrics):
        every = trainer.config.logging.telemetry_interval
        if every and metrics.step % every == 0 and trainer.titans_config.has_memory and _healthy(trainer):
            trainer.logger.metrics(metrics.step, trainer.telemetry())


class Evaluation(Callback):
    """Validation loss, then `train.eval_tasks` if any, at the start, periodically and at the end."""

    def _evaluate(self, trainer, label: str) -> None:
        trainer.log_validation(label)
        if trainer.config.train.eval_tasks:
            trainer.log_eval_tasks(label)

    def on_train_start(self, trainer):
        if trainer.step == 0 or trainer.config.train.eval_interval == 0:
            self._evaluate(trainer, "resumed" if trainer.result.resumed_from else "start")

    def on_step_end(self, trainer, metrics):
        every = trainer.config.train.eval_interval
        if (every and metrics.step % every == 0 and metrics.step != trainer.batch.total_steps
                and _healthy(trainer)):
            self._evaluate(trainer, "periodic")

    def on_train_end(self, trainer):
        self._evaluate(trainer, "end")


class Checkpointing(Callback):
    """Saves every `checkpoint.interval` steps, on a stop that asks for it and at the end.

    A saved checkpoint becomes `latest` only once a finite loss has seen its weights: the next
    step's training loss, or, when no step follows (a stop, the end), the validation loss at its
    step. Otherwise it is deleted, so a blow-up in the step that saves is never resumed from."""

    def on_train_start(self, trainer):
        self.saved_at = trainer.step if trainer.result.resumed_from else None

    def on_step_end(self, trainer, metrics):
        trainer.confirm_checkpoint(metrics.loss, weights_step=metrics.step - 1)  # the weights this loss saw
        every = trainer.config.checkpoint.interval
        if trainer.stop is not None:
            if trainer.stop.save:
                self._save(trainer, no_step_follows=True)
        elif every and metrics.step % every == 0 and metrics.step != trainer.batch.total_steps:
            self._save(trainer, no_step_follows=False)

    def on_train_end(self, trainer):
        if trainer.config.checkpoint.save_final and self.saved_at != trainer.step and trainer.stop is None:
            self._save(trainer, no_step_follows=True)

    def _save(self, trainer, no_step_follows: bool) -> None:
        trainer.save()
        self.saved_at = trainer.step
        if no_step_follows:
            loss = trainer.result.validation.get(trainer.step)
            trainer.confirm_checkpoint(trainer.log_validation("checkpoint") if loss is None else loss,
                                       weights_step=trainer.step)


def _healthy(trainer) -> bool:
    """Not stopping for divergence: a diverged model is neither evaluated nor measured."""
    return trainer.stop is None or trainer.stop.save


def default_callbacks() -> list[Callback]:
    return [DivergenceStop(), SignalStop(), ProgressLog(), TelemetryLog(), Evaluation(), Checkpointing()]
