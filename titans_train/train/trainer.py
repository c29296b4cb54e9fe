"""The training loop: resume, micro-steps, optimizer step, stop/checkpoint/eval/log decisions.

`train(config)` runs a whole job in this process (one rank of N under torchrun, or alone) and
returns a `TrainResult`. Order inside a step, as nanoGPT: lr, micro-batches (forward, backward),
clip + optimizer step (DeepSpeed, at the accumulation boundary), then the collective decisions
(stop on a signal, checkpoint, validate, log).

Signals: SIGTERM and SIGUSR1 set a flag; at the end of the current step all ranks agree (an
all-reduce of the flag), save a checkpoint and return `EXIT_REQUEUE` (75, EX_TEMPFAIL), which
SLURM scripts use to requeue the job. The resumed job continues from that checkpoint exactly.
"""

from __future__ import annotations

import math
import os
import random
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from titans_train.config import batch_plan, model_config, to_container, validate
from titans_train.parallel.zero import optimizer_step
from titans_train.train.checkpoint import CheckpointInfo, CheckpointManager
from titans_train.train.distributed import (
    all_reduce_max_flag,
    all_reduce_mean,
    barrier,
    build_parallel_context,
    current_device,
    init_distributed,
    world_size_from_environment,
)
from titans_train.train.engine import build_engine
from titans_train.train.logging import ProgressMeter, RunLogger, progress_line
from titans_train.train.objective import LanguageModelObjective
from titans_train.train.run_data import RunData, build_run_data

EXIT_OK = 0
EXIT_DIVERGED = 3  # the loss became NaN/inf: stopped without saving (the last checkpoint is sane)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; requeue me
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainResult:
    exit_code: int
    step: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean training loss
    validation: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    resumed_from: str | None = None
    checkpoint: str | None = None
    rank: int = 0


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop polls it once per step."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __call__(self, signal_number, frame) -> None:
        self.signal_number = signal_number

    @contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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
    def __init__(self, config: DictConfig, hooks: Sequence[Callable[["Trainer", int], None]] = ()):
        self.config = config
        self.hooks = list(hooks)
        world_size = world_size_from_environment()
        validate(config, world_size=world_size)  # before any work: names the key at fault
        self.plan = batch_plan(config, world_size)
        init_distributed(config.parallel.backend)
        self.context = build_parallel_context(config.parallel)
        self.device = current_device()
        self.is_logger = self.context.rank == 0
        self.resolved = to_container(config)
        self.logger = RunLogger(config, enabled=self.is_logger, resolved_config=self.resolved)
        if self.is_logger:
            _write_resolved_config(config)
        self.step = 0
        self.tokens_seen = 0
        self.result = TrainResult(exit_code=EXIT_OK, step=0, tokens_seen=0)

    # ---- setup --------------------------------------------------------------------------------
    def _build(self) -> None:
        config = self.config
        seed_everything(config.train.seed)  # the same initial weights on every rank
        self.data: RunData = build_run_data(config, self.context, self.plan, log=self.logger.info)
        titans_config = model_config(config)
        if titans_config.vocab_size < self.data.tokenizer.vocab_size:
            from titans_train.config import InvalidValueError

            raise InvalidValueError(
                "model.vocab_size",
                f"{titans_config.vocab_size} is smaller than the tokenizer's {self.data.tokenizer.vocab_size} tokens",
            )
        from titans_train.model import TitansLM, no_weight_decay

        self.titans_config = titans_config
        model = TitansLM(titans_config)
        self.model_parallel = self.context.tp_size > 1 or self.context.sp_size > 1
        if self.model_parallel:
            # Tensor parallelism shards the built model in place; sequence parallelism lives in
            # the objective, which relays the layer states between span owners.
            from titans_train.parallel.parallelize import ParallelObjective, parallelize

            parallelize(model, config.parallel, self.context)
            objective = ParallelObjective(model, self.context, config.parallel.activation_checkpointing)
        else:
            objective = LanguageModelObjective(model, config.parallel.activation_checkpointing)
        self.checkpoints = CheckpointManager(config.checkpoint.dir, config.checkpoint.keep_last,
                                             rank=self.context.rank, world_size=self.context.data_world_size
                                             * self.context.tp_size * self.context.sp_size,
                                             log=self.logger.warning)
        resume = self._pick_resume_checkpoint()
        load_universal = bool(
            resume is not None and config.parallel.zero_stage > 0
            and resume.manifest.get("data_parallel_size") != self.plan.data_parallel_size
        )
        if load_universal and self.context.tp_size > 1:
            from titans_train.config import InvalidValueError

            manifest = resume.manifest
            raise InvalidValueError(
                "parallel.tp",
                f"cannot resume {resume.path} (written by {manifest.get('world_size')} processes, data-parallel "
                f"size {manifest.get('data_parallel_size')}) on data-parallel size {self.plan.data_parallel_size}: "
                "changing it goes through DeepSpeed's universal checkpoint format, which cannot merge this "
                "model's tensor-parallel shards yet. Relaunch with the checkpoint's world size, or start "
                "afresh with checkpoint.auto_resume=false or another checkpoint.dir.",
            )
        self.engine, self.optimizer, self.scheduler = build_engine(
            objective, config, self.plan, self.context,
            no_weight_decay=lambda name, param: no_weight_decay(name.removeprefix("model."), param),
            load_universal=load_universal,
        )
        if resume is not None:
            self._resume(resume, load_universal)
        self.train_batches = self.data.train_batches()

    def _pick_resume_checkpoint(self) -> CheckpointInfo | None:
        if not self.config.checkpoint.auto_resume:
            return None
        for candidate in self.checkpoints.candidates():
            if isinstance(candidate, CheckpointInfo):
                return candidate
            tag, reason = candidate
            self.logger.warning(f"checkpoint {tag} is damaged ({reason}); trying the previous one")
        return None

    def _resume(self, info: CheckpointInfo, load_universal: bool) -> None:
        how = " (converted to a universal checkpoint: data-parallel size changed)" if load_universal else ""
        self.logger.info(f"resuming from {info.path}{how}")
        client_state = self.checkpoints.load(self.engine, info, load_universal)
        trainer_state = client_state["titans_trainer"]
        self.step = int(trainer_state["step"])
        self.tokens_seen = int(trainer_state["tokens_seen"])
        self.data.load_state_dict(trainer_state["data"])
        self.result.resumed_from = str(info.path)

    # ---- pieces of a step ---------------------------------------------------------------------
    def _next_micro_batch(self) -> torch.Tensor:
        return next(self.train_batches).to(self.device, non_blocking=True)

    def _forward(self, tokens: torch.Tensor):
        """(what to back-propagate, the micro-batch's loss, what to call after backward)."""
        if self.model_parallel:
            step = self.engine(tokens)  # a StepLoss: its loss is already the global mean
            return step.objective, step.loss, step.relay.finish
        loss, _ = self.engine(tokens)
        return loss, loss, lambda: None

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (global mean loss, lr used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.grad_norm = None

        def record_replicated_grad_norm():
            if self.config.parallel.zero_stage == 0 and self.context.tp_size == 1:
                self.grad_norm = self._replicated_grad_norm()

        micro_batches = [self._next_micro_batch() for _ in range(self.plan.gradient_accumulation_steps)]
        losses = optimizer_step(self.engine, self.context, micro_batches, self._forward,
                                after_backward=record_replicated_grad_norm)
        if self.grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else None
        local = float(torch.stack([loss.detach().double().cpu() for loss in losses]).mean())
        return all_reduce_mean(local, group=self.context.gradient_group), lr

    def _replicated_grad_norm(self) -> float:
        """The pre-clipping gradient norm when every rank holds all (averaged) gradients.

        DeepSpeed reports it itself only under ZeRO >= 1; without ZeRO the gradients are whole.
        """
        squares = [p.grad.detach().float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `train.eval_batches` micro-batches per rank of the validation split."""
        self.engine.eval()
        total = 0.0
        batches = self.data.validation_batches()
        for _ in range(self.config.train.eval_batches):
            _, loss, finish = self._forward(next(batches).to(self.device))
            finish()
            total += float(loss)
        self.engine.train()
        return all_reduce_mean(total / self.config.train.eval_batches, group=self.context.gradient_group)

    @torch.no_grad()
    def telemetry(self) -> dict[str, float]:
        """Per-layer memory statistics on the first validation micro-batch (detached forward)."""
        self.engine.eval()
        output = self.engine(next(self.data.validation_batches()).to(self.device), return_telemetry=True)
        if self.model_parallel:  # a StepLoss, its telemetry already that of the whole replica
            output.relay.finish()
            telemetry = output.telemetry
        else:
            _, telemetry = output
        self.engine.train()
        return _telemetry_metrics(telemetry)

    def save(self) -> Path:
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.data.state_dict()}
        client_state = {"titans_trainer": trainer_state, "titans_config": self.resolved}
        path = self.checkpoints.save(
            self.engine, self.step, client_state,
            manifest_extra={"tokens_seen": self.tokens_seen, "data_parallel_size": self.plan.data_parallel_size,
                            "zero_stage": self.config.parallel.zero_stage, "config": self.resolved},
        )
        self.logger.info(f"checkpoint saved: {path}")
        self.result.checkpoint = str(path)
        return path

    def _log_validation(self, label: str) -> float:
        loss = self.evaluate()
        ppl = math.exp(min(loss, 50.0))
        self.result.validation[self.step] = loss
        self.logger.info(f"validation ({label}, step {self.step}): loss {loss:.4f} | ppl {ppl:.2f}")
        self.logger.metrics(self.step, {"val/loss": loss, "val/ppl": ppl})
        return loss

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            with StopFlag().installed() as stop:
                return self._run(stop)
        finally:
            self.logger.close()

    def _run(self, stop: StopFlag) -> TrainResult:
        self._build()
        config, plan = self.config, self.plan
        total = plan.total_steps
        self.logger.info(
            f"{config.name}: {self.titans_config.variant} model, "
            f"{sum(p.numel() for p in self.engine.module.parameters()) / 1e6:.2f}M parameters"
            f"{' on this rank' if self.model_parallel else ''} | "
            f"{total} steps x {plan.tokens_per_step} tokens | micro batch {config.train.micro_batch_size} x "
            f"{plan.data_parallel_size} ranks x {plan.gradient_accumulation_steps} accumulation | "
            f"ZeRO {config.parallel.zero_stage}, {config.train.precision}"
        )
        from titans_train.model.flops import flops_per_token

        meter = ProgressMeter(total, plan.tokens_per_step, float(flops_per_token(self.titans_config, config.train.seq_len)),
                              config.logging.peak_flops_per_device * self.context.data_world_size
                              * self.context.tp_size * self.context.sp_size)
        if self.step == 0 or config.train.eval_interval == 0:
            self._log_validation("resumed" if self.result.resumed_from else "start")
        meter.start(self.step)
        saved_at = self.step if self.result.resumed_from else None
        while self.step < total:
            loss, lr = self._train_step()
            self.step += 1
            self.tokens_seen += plan.tokens_per_step
            self.result.losses[self.step] = loss
            for hook in self.hooks:
                hook(self, self.step)
            if not math.isfinite(loss):  # the same on every rank: the loss is all-reduced
                self.logger.warning(f"loss is {loss} at step {self.step}: stopping without saving; the last "
                                    "checkpoint predates the divergence (lower train.lr or model.theta_max)")
                self.result.exit_code = EXIT_DIVERGED
                break
            stopping = all_reduce_max_flag(stop.signal_number is not None)
            last = self.step == total
            if self.step % config.logging.interval == 0 or last or stopping:
                speed = meter.measure(self.step)
                grad_norm = self.grad_norm
                self.logger.info(progress_line(self.step, total, self.tokens_seen, loss, lr, grad_norm, speed))
                values = {"train/loss": loss, "train/lr": lr, "train/tokens": self.tokens_seen, **speed}
                if grad_norm is not None:
                    values["train/grad_norm"] = grad_norm
                self.logger.metrics(self.step, values)
            telemetry_every = config.logging.telemetry_interval
            if telemetry_every and self.step % telemetry_every == 0 and self.titans_config.has_memory:
                self.logger.metrics(self.step, self.telemetry())
            if config.train.eval_interval and self.step % config.train.eval_interval == 0 and not last:
                self._log_validation("periodic")
            if stopping:
                self.logger.info(f"stop requested (signal {stop.signal_number}); saving at step {self.step}")
                self.save()
                self.result.exit_code = EXIT_REQUEUE
                break
            if config.checkpoint.interval and self.step % config.checkpoint.interval == 0 and not last:
                self.save()
                saved_at = self.step
        else:
            self._log_validation("end")
            if config.checkpoint.save_final and saved_at != self.step:
                self.save()
        self.result.step = self.step
        self.result.tokens_seen = self.tokens_seen
        self.result.rank = self.context.rank
        barrier()
        return self.result


def train(config: DictConfig, hooks: Sequence[Callable[[Trainer, int], None]] = ()) -> TrainResult:
    return Trainer(config, hooks).run()
