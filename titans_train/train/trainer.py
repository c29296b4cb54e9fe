"""The training loop: build, resume, then per step lr -> optimizer step -> callbacks.

`train(config)` runs a whole job in this process (one rank of N under torchrun, or alone) and
returns a `TrainResult`. The model is built already parallelised onto this rank's layout, each
rank materialising only its part (`titans_train.parallel.construction`, any layout, a world of
one included), and wrapped by DeepSpeed. One optimizer step is `titans_train.parallel.zero.optimizer_step` (micro-batches,
backward, clip, step); everything else (logging, MFU, telemetry, evaluation, checkpointing, the
divergence and signal stops) is a callback (`callbacks.py`, which documents their order).

Exit codes (`TrainResult.exit_code`): 0 done, 3 the loss diverged (a training or validation loss
was NaN/inf: stopped without saving), 75 stopped by SIGTERM/SIGUSR1 after a complete checkpoint,
or before the first step with nothing to save (requeue: the next start resumes exactly).

A resume is refused when the config differs from the checkpoint's beyond the keys
`resume_config.SAFE_TO_CHANGE` lists; `config.yaml` in the run dir is written only once the run
is known to start (fresh, or resuming a compatible checkpoint), so it never claims a config that
did not run.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from titans_train.config import batch_plan, model_config, to_container
from titans_train.config.errors import InvalidValueError
from titans_train.errors import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE  # noqa: F401 (the contract, re-exported)
from titans_train.train import stop_signals
from titans_train.train.callbacks import Callback, StepMetrics, StopRequest, default_callbacks, divergence_stop
from titans_train.train.checkpoint import PENDING_PREFIX, CheckpointInfo, CheckpointManager, assign_checkpoint_writers
from titans_train.train.distributed import (
    all_reduce_max_flag,
    barrier,
    current_device,
    init_distributed,
    world_size_from_environment,
)
from titans_train.train.engine import build_engine, deepspeed_config
from titans_train.train.logging import RunLogger
from titans_train.train.run_data import RunData, build_run_data
from titans_train.train.resume_config import check_resumable
from titans_train.train.run_lock import RunDirectoryLocked, RunLock
from titans_train.train.schedule import apply_schedule_at_current_step


@dataclass
class TrainResult:
    exit_code: int
    step: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean training loss
    validation: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    eval_tasks: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> train.eval_tasks metrics
    resumed_from: str | None = None
    checkpoint: str | None = None
    rank: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_resolved_config(config: DictConfig) -> None:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / ".config.yaml.tmp"
    temporary.write_text(OmegaConf.to_yaml(config, resolve=True))
    os.replace(temporary, run_dir / "config.yaml")


def _telemetry_metrics(telemetry: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """"layers.{i}.memory.{name}" -> "telemetry/layer{i}/{name}" floats."""
    if not telemetry:
        return {}
    result = {}
    for key, value in telemetry.items():
        parts = key.split(".")
        name = f"telemetry/layer{parts[1]}/{parts[-1]}" if len(parts) >= 3 and parts[0] == "layers" else f"telemetry/{key}"
        result[name] = float(value)
    return result


class Trainer:
    """One run on this rank. `config` must be validated (`load_recipe` does it) for this world.

    `callbacks` run before the default ones (`callbacks.default_callbacks`), in order.
    """

    def __init__(self, config: DictConfig, callbacks: Sequence[Callback] = ()):
        stop_signals.catch()  # a signal from now on is honoured (`titans-train train` catches earlier)
        self.config = config
        self.batch = batch_plan(config, world_size_from_environment())
        init_distributed(config.parallel.backend, config.parallel.timeout_s)
        from titans_train.parallel import ParallelContext

        self.context = ParallelContext.initialize(tp=config.parallel.tp, sp=config.parallel.sp)
        self.run_lock = RunLock(config.run_dir)
        refusal = None
        if self.context.rank == 0:
            try:
                self.run_lock.acquire()
            except RunDirectoryLocked as error:
                refusal = error
        if all_reduce_max_flag(refusal is not None):  # every rank stops, not only rank 0
            raise refusal or RunDirectoryLocked(f"run dir {config.run_dir} is in use by a running job")
        self.device = current_device()
        self.resolved = to_container(config)
        self.logger = RunLogger(config, enabled=self.context.rank == 0, resolved_config=self.resolved)
        self.callbacks = [*callbacks, *default_callbacks()]
        self.step = 0
        self.tokens_seen = 0
        self.stop: StopRequest | None = None
        self._task_evaluation = None
        self.pending_checkpoint: tuple[Path, int] | None = None  # (dir, step): not yet confirmed by a finite loss
        self.result = TrainResult(exit_code=EXIT_OK, step=0, tokens_seen=0)

    # ---- setup --------------------------------------------------------------------------------
    def _build(self) -> None:
        from titans_train.model import no_weight_decay
        from titans_train.model.flops import flops_per_token
        from titans_train.parallel.construction import build_parallel_model
        from titans_train.parallel.parallelize import ParallelObjective
        from titans_train.parallel.zero import deepspeed_data_parallel_size

        config = self.config
        self.checkpoints = CheckpointManager(config.checkpoint.dir, config.checkpoint.keep_last,
                                             rank=self.context.rank, world_size=self.context.layout.world_size,
                                             log=self.logger.warning)
        self.checkpoints.clean_leftovers()
        resume = self._pick_resume_checkpoint()
        if self.context.rank == 0:
            _write_resolved_config(config)  # the config that runs: fresh, or compatible with `resume`
        seed_everything(config.train.seed)  # dropout, data order; the weights use the seed directly
        self.data: RunData = build_run_data(config, self.context, self.batch, log=self.logger.info)
        self.titans_config = model_config(config)
        if self.titans_config.vocab_size < self.data.tokenizer.vocab_size:
            raise InvalidValueError(
                "model.vocab_size",
                f"{self.titans_config.vocab_size} is smaller than the tokenizer's {self.data.tokenizer.vocab_size} tokens",
            )
        self.flops_per_token = float(flops_per_token(self.titans_config, config.train.seq_len))
        initial_weights = None
        if config.train.init_from:
            from titans_train.convert.init_from import load_initial_weights

            initial_weights = load_initial_weights(self.titans_config, config.train.init_from)
        # Each rank materialises only its part of the model (its tp shards, its ZeRO-3 partition),
        # every part drawn by a rule of (train.seed, parameter path): the same weights on any layout.
        zero3 = config.parallel.zero_stage == 3
        model, self.parallel_plan = build_parallel_model(
            self.titans_config, config.parallel, self.context, seed=config.train.seed,
            initial_weights=initial_weights, device=self.device,
            zero3_config=deepspeed_config(config, self.batch, self.context) if zero3 else None,
            precision=config.train.precision,
        )
        del initial_weights
        # ZeRO's shards are cut over its own data-parallel group (dp x sp, or dp for ZeRO-3 with
        # sp) and tp: a checkpoint of another layout is re-cut first (convert.reshard.resume_route).
        self.zero_partitions = deepspeed_data_parallel_size(self.context, config.parallel.zero_stage)
        self.resume_route = "same"
        if resume is not None:
            from titans_train.convert.reshard import resume_route

            self.resume_route = resume_route(resume.manifest, config.parallel.zero_stage, self.context.tp_size,
                                             self.zero_partitions, config.train.precision, resume.path)
        load_universal = self.resume_route in ("deepspeed", "tensor_parallel")
        self.engine, self.optimizer, self.scheduler = build_engine(
            ParallelObjective(model, self.parallel_plan), config, self.batch, self.context,
            no_weight_decay=lambda name, param: no_weight_decay(name.removeprefix("model."), param),
            load_universal=load_universal,
        )
        assign_checkpoint_writers(self.engine, self.context)
        if resume is not None:
            self._resume(resume)
        self.train_batches = self.data.train_batches()

    def _pick_resume_checkpoint(self) -> CheckpointInfo | None:
        """The newest undamaged checkpoint (`CheckpointManager.newest_usable`), if its run's config
        differs from this one only in keys safe to change (else `ConfigChangedOnResume`)."""
        if not self.config.checkpoint.auto_resume:
            return None
        resume = self.checkpoints.newest_usable()
        if resume is not None:
            check_resumable(resume.manifest["config"], self.resolved, str(resume.path))
        return resume

    def _resume(self, info: CheckpointInfo) -> None:
        how = f" (re-cut for this layout: {self.resume_route})" if self.resume_route != "same" else ""
        self.logger.info(f"resuming from {info.path}{how}")
        client_state = self.checkpoints.load(self.engine, info, self.resume_route, self.context.tp_rank,
                                             self.context.tp_size)
        trainer_state = client_state["titans_trainer"]
        self.step = int(trainer_state["step"])
        self.tokens_seen = int(trainer_state["tokens_seen"])
        self.data.load_state_dict(trainer_state["data"])
        apply_schedule_at_current_step(self.scheduler)  # this run's schedule (train.steps may differ)
        self.result.resumed_from = str(info.path)

    # ---- what callbacks call ------------------------------------------------------------------
    def request_stop(self, request: StopRequest) -> None:
        """End the run after this step's callbacks. The first request wins, except that a
        divergence (which saves nothing) overrides a stop that would save."""
        if self.stop is not None and not (self.stop.save and request.exit_code == EXIT_DIVERGED):
            return
        self.stop = request
        (self.logger.info if request.save else self.logger.warning)(request.reason)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the first `train.eval_batches x micro_batch_size` samples of the
        validation split: the same samples, so the same number, on any layout. Replica r takes
        samples r, r + dp, ... in equal rounds (padding slots weigh 0), and each sample weighs
        micro x dp / N, so every round's `step.loss` (a mean over the replicas' micro-batches) is
        that round's share of the mean."""
        from titans_train.eval.distributed import padded_rounds

        micro = self.config.train.micro_batch_size
        count = self.config.train.eval_batches * micro
        dp = self.context.data_world_size
        self.engine.eval()
        total = 0.0
        for positions, real in padded_rounds(count, self.context.data_rank, dp, micro):
            weights = torch.tensor(real, dtype=torch.float32) * (micro * dp / count)
            step = self.engine(self.data.validation_samples(positions).to(self.device),
                               sample_weights=weights.to(self.device))
            step.relay.finish()
            total += float(step.loss)
        self.engine.train()
        return total

    @torch.no_grad()
    def telemetry(self) -> dict[str, float]:
        """Per-layer memory statistics on the first validation micro-batch (detached forward),
        those of the whole replica (every head, every span)."""
        self.engine.eval()
        step = self.engine(next(self.data.validation_batches()).to(self.device), return_telemetry=True)
        step.relay.finish()
        self.engine.train()
        return _telemetry_metrics(step.telemetry)

    def log_validation(self, label: str) -> float:
        """Validate, log, and stop the run as diverged (exit 3) if the loss is not finite."""
        loss = self.evaluate()
        ppl = math.exp(min(loss, 50.0))
        self.result.validation[self.step] = loss
        self.logger.info(f"validation ({label}, step {self.step}): loss {loss:.4f} | ppl {ppl:.2f}")
        self.logger.metrics(self.step, {"val/loss": loss, "val/ppl": ppl})
        if not math.isfinite(loss):  # the same on every rank: a mean over every replica
            self.request_stop(divergence_stop("validation loss", loss, self.step))
        return loss

    def log_eval_tasks(self, label: str) -> dict:
        """`train.eval_tasks` on the current weights (`titans_train.eval.during_training`), logged."""
        from titans_train.eval.tasks import flat_metrics

        if self._task_evaluation is None:
            from titans_train.eval.during_training import TrainingEvaluation

            self._task_evaluation = TrainingEvaluation(self)
        metrics = flat_metrics(self._task_evaluation.run())
        self.result.eval_tasks[self.step] = metrics
        summary = " | ".join(f"{key.removeprefix('eval/')} {value:.4g}" for key, value in metrics.items()
                             if key.count("/") == 2)
        self.logger.info(f"eval tasks ({label}, step {self.step}): {summary}")
        self.logger.metrics(self.step, metrics)
        return metrics

    def save(self) -> Path:
        """Save a checkpoint of this step; it becomes `latest` at `confirm_checkpoint`."""
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.data.state_dict()}
        client_state = {"titans_trainer": trainer_state, "titans_config": self.resolved}
        path = self.checkpoints.save(
            self.engine, self.step, client_state,
            manifest_extra={"tokens_seen": self.tokens_seen, "data_parallel_size": self.batch.data_parallel_size,
                            "zero_partitions": self.zero_partitions, "zero_stage": self.config.parallel.zero_stage,
                            "config": self.resolved},
        )
        self.pending_checkpoint = (path, self.step)
        return path

    def confirm_checkpoint(self, loss: float, weights_step: int) -> None:
        """`loss` was computed with the weights after optimizer step `weights_step` (a training
        loss: those of the step before; a validation loss: those of its step). If they are the
        pending checkpoint's, promote it to `latest` when the loss is finite, delete it otherwise."""
        if self.pending_checkpoint is None or self.pending_checkpoint[1] != weights_step:
            return
        (pending, _), self.pending_checkpoint = self.pending_checkpoint, None
        if math.isfinite(loss):
            path = self.checkpoints.confirm(pending)
            self.logger.info(f"checkpoint saved: {path}")
            self.result.checkpoint = str(path)
        else:
            self.checkpoints.discard(pending)
            self.logger.warning(f"checkpoint {pending.name.removeprefix(PENDING_PREFIX)} deleted: a loss computed "
                                f"with its weights is {loss}")

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            for callback in self.callbacks:
                callback.close()
            self.logger.close()
            self.run_lock.release()

    def _describe(self) -> str:
        config, batch = self.config, self.batch
        where = " on this rank" if self.context.layout.world_size > self.batch.data_parallel_size else ""
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return (f"{config.name}: {self.titans_config.variant} model, {parameters / 1e6:.2f}M parameters{where} | "
                f"{batch.total_steps} steps x {batch.tokens_per_step} tokens | micro batch "
                f"{config.train.micro_batch_size} x {batch.data_parallel_size} data-parallel ranks x "
                f"{batch.gradient_accumulation_steps} accumulation | ZeRO {config.parallel.zero_stage}, "
                f"{config.train.precision}")

    def _stop_if_signalled(self, moment: str) -> None:
        """A stop signal before the first step (agreed by every rank): nothing was trained since the
        last checkpoint, so stop without saving; exit 75, and the requeued job resumes from it."""
        if self.stop is None and all_reduce_max_flag(stop_signals.received() is not None):
            self.request_stop(StopRequest(
                EXIT_REQUEUE, save=False,
                reason=f"stop requested ({stop_signals.description()}) {moment}: nothing trained since the last "
                       "checkpoint, nothing to save; exiting for a requeue"))

    def _run(self) -> TrainResult:
        from titans_train.parallel.zero import optimizer_step

        for callback in self.callbacks:
            callback.setup(self)
        self._stop_if_signalled("while starting")
        if self.stop is None:
            self._build()
            self.logger.info(self._describe())
            self._stop_if_signalled("while building")
        if self.stop is None:
            for callback in self.callbacks:
                callback.on_train_start(self)
        while self.step < self.batch.total_steps and self.stop is None:
            lr = self.optimizer.param_groups[0]["lr"]
            micro_batches = [next(self.train_batches).to(self.device, non_blocking=True)
                             for _ in range(self.batch.gradient_accumulation_steps)]
            outcome = optimizer_step(self.engine, self.parallel_plan, micro_batches)
            self.step += 1
            self.tokens_seen += self.batch.tokens_per_step
            self.result.losses[self.step] = outcome.loss
            metrics = StepMetrics(step=self.step, loss=outcome.loss, lr=lr, grad_norm=outcome.grad_norm)
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
        if self.stop is None:
            for callback in self.callbacks:
                callback.on_train_end(self)  # the final validation may still find a divergence
        if self.stop is not None:
            self.result.exit_code = self.stop.exit_code
        self.result.step = self.step
        self.result.tokens_seen = self.tokens_seen
        self.result.rank = self.context.rank
        barrier()
        return self.result


def train(config: DictConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    try:
        return Trainer(config, callbacks).run()
    finally:
        stop_signals.release()  # also when the trainer could not start (its run() releases them otherwise)
