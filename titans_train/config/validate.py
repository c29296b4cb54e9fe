"""Cross-field rules of a run config, checked before any model, data or process group exists.

Each rule raises a typed `ConfigError` naming the key to change and why. The batch arithmetic
lives in `batch_plan`, which the trainer also uses, so the numbers checked are the numbers run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from omegaconf import DictConfig

from titans_train.config.errors import BatchArithmeticError, InvalidValueError, check_choice
from titans_train.config.schema import BACKENDS, PRECISIONS, SCHEDULES, WANDB_MODES


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch maps onto processes, and how long the run is."""

    data_parallel_size: int
    global_batch_samples: int
    gradient_accumulation_steps: int
    total_steps: int
    tokens_per_step: int


def data_parallel_size(config: DictConfig, world_size: int) -> int:
    """dp = world / (tp x sp), by the rank-grid arithmetic of `titans_train.parallel.layout`."""
    from titans_train.parallel.layout import ParallelConfigError, ParallelLayout

    try:
        return ParallelLayout.from_world(world_size, tp=config.parallel.tp, sp=config.parallel.sp).dp
    except ParallelConfigError as error:
        raise BatchArithmeticError(error.key, error.reason) from error


def batch_plan(config: DictConfig, world_size: int) -> BatchPlan:
    train = config.train
    dp = data_parallel_size(config, world_size)
    if train.global_batch_tokens % train.seq_len:
        raise BatchArithmeticError(
            "train.global_batch_tokens",
            f"{train.global_batch_tokens} is not a multiple of train.seq_len={train.seq_len}; "
            f"nearest multiples: {train.global_batch_tokens // train.seq_len * train.seq_len} or "
            f"{(train.global_batch_tokens // train.seq_len + 1) * train.seq_len}",
        )
    samples = train.global_batch_tokens // train.seq_len
    per_micro_step = train.micro_batch_size * dp
    if samples % per_micro_step:
        raise BatchArithmeticError(
            "train.global_batch_tokens",
            f"the global batch of {samples} samples (train.global_batch_tokens="
            f"{train.global_batch_tokens} / train.seq_len={train.seq_len}) is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp} = "
            f"{per_micro_step}; change train.micro_batch_size or train.global_batch_tokens",
        )
    if train.tokens > 0:
        total_steps = math.ceil(train.tokens / train.global_batch_tokens)
    else:
        total_steps = train.steps
    return BatchPlan(
        data_parallel_size=dp,
        global_batch_samples=samples,
        gradient_accumulation_steps=samples // per_micro_step,
        total_steps=total_steps,
        tokens_per_step=train.global_batch_tokens,
    )


def _positive(config: DictConfig, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if value <= 0:
            raise InvalidValueError(key, f"must be > 0, got {value}")


def _not_negative(config: DictConfig, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if value < 0:
            raise InvalidValueError(key, f"must be >= 0 (0 turns it off where it is an interval), got {value}")


def validate_parallel(config: DictConfig) -> None:
    """The layout checks of `titans_train.parallel.validation`, run before any process exists.
    The world size is checked by `batch_plan` (the same `ParallelLayout` arithmetic)."""
    from titans_train.parallel.layout import ParallelConfigError
    from titans_train.parallel.validation import validate_parallel_layout

    parallel = config.parallel
    if parallel.tp < 1 or parallel.sp < 1:
        raise InvalidValueError("parallel.tp", f"tp and sp must be >= 1, got tp={parallel.tp} sp={parallel.sp}")
    if parallel.zero_stage not in (0, 1, 2, 3):
        raise InvalidValueError("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {parallel.zero_stage}")
    check_choice("parallel.backend", parallel.backend, BACKENDS)
    if parallel.zero_bucket_elements < 0:
        raise InvalidValueError("parallel.zero_bucket_elements", "must be 0 (sized from the model) or a number of "
                                f"elements >= 1, got {parallel.zero_bucket_elements}")
    try:
        validate_parallel_layout(
            model_config(config), tp=parallel.tp, sp=parallel.sp, world_size=None,
            seq_len=config.train.seq_len, tp_sequence_sharding=parallel.tp_sequence_sharding,
            sp_schedule=parallel.sp_schedule, activation_checkpointing=parallel.activation_checkpointing,
            zero_stage=parallel.zero_stage)
    except ParallelConfigError as error:
        raise InvalidValueError(error.key, error.reason) from error


def model_config(config: DictConfig):
    """The model section as the model package's `TitansConfig`, its own checks applied."""
    from omegaconf import OmegaConf

    from titans_train.model import ConfigError as ModelConfigError
    from titans_train.model import TitansConfig

    try:
        return TitansConfig(**OmegaConf.to_container(config.model, resolve=True))
    except ModelConfigError as error:
        raise InvalidValueError(f"model.{error.field}", str(error)) from error


def _check_eval_tasks(config: DictConfig) -> None:
    from titans_train.eval import TASKS

    for task in config.train.eval_tasks:
        check_choice("train.eval_tasks", task, TASKS)
    if not config.train.eval_tasks:
        return
    for length in config.train.eval_lengths:
        text = str(length)
        if not re.fullmatch(r"\d+|\d*\.?\d+x", text):
            raise InvalidValueError("train.eval_lengths", f"{text!r} is neither a token count (512) nor a multiple "
                                    "of train.seq_len (2x)")
    # The tasks call the model's own forward, whose sequence-sharded norms expect the training drive.
    if config.parallel.tp_sequence_sharding and config.parallel.tp > 1:
        raise InvalidValueError("train.eval_tasks", "does not run with parallel.tp_sequence_sharding; evaluate "
                                "this run's checkpoints with `titans-train eval` instead")


def validate(config: DictConfig, world_size: int | None = 1) -> None:
    train = config.train
    model_config(config)
    check_choice("train.schedule", train.schedule, SCHEDULES)
    check_choice("train.precision", train.precision, PRECISIONS)
    check_choice("train.optimizer_precision", train.optimizer_precision, PRECISIONS)
    if train.optimizer_precision == "bf16" and (train.precision != "bf16" or config.parallel.zero_stage < 1):
        raise InvalidValueError("train.optimizer_precision", "bf16 optimizer state needs train.precision=bf16 and "
                                f"parallel.zero_stage >= 1 (got {train.precision}, ZeRO {config.parallel.zero_stage}); "
                                "set both, or train.optimizer_precision=fp32")
    check_choice("logging.wandb_mode", config.logging.wandb_mode, WANDB_MODES)
    _positive(config, "train.global_batch_tokens", "train.micro_batch_size", "train.seq_len", "train.lr")
    if (train.tokens > 0) == (train.steps > 0):
        raise InvalidValueError(
            "train.tokens", f"set exactly one of train.tokens and train.steps > 0 (got tokens={train.tokens}, steps={train.steps})"
        )
    if len(train.betas) != 2 or not all(0 <= b < 1 for b in train.betas):
        raise InvalidValueError("train.betas", f"must be two numbers in [0, 1), got {list(train.betas)}")
    if not 0 <= train.min_lr <= train.lr:
        raise InvalidValueError("train.min_lr", f"must be in [0, train.lr={train.lr}], got {train.min_lr}")
    if not 0 < train.decay_fraction <= 1:
        raise InvalidValueError("train.decay_fraction", f"must be in (0, 1], got {train.decay_fraction}")
    _not_negative(config, "train.warmup_steps", "train.grad_clip", "train.weight_decay", "train.eval_interval",
                  "checkpoint.interval", "logging.telemetry_interval")
    _positive(config, "train.eps", "parallel.timeout_s")
    if train.eval_batches < 1:
        raise InvalidValueError("train.eval_batches", f"must be >= 1, got {train.eval_batches}")
    _check_eval_tasks(config)
    if config.checkpoint.keep_last < 1:
        raise InvalidValueError("checkpoint.keep_last", f"must be >= 1, got {config.checkpoint.keep_last}")
    if config.logging.interval < 1:
        raise InvalidValueError("logging.interval", f"must be >= 1, got {config.logging.interval}")
    if config.data.source not in ("builtin", "shards"):
        raise InvalidValueError("data.source", f"must be 'builtin' or 'shards', got {config.data.source!r}")
    from titans_train.data.shards import VERIFY_LEVELS

    check_choice("data.verify", config.data.verify, VERIFY_LEVELS)
    if config.data.source == "shards" and not config.data.train_dir:
        raise InvalidValueError("data.train_dir", "data.source=shards needs data.train_dir (a prepared shard directory)")
    validate_parallel(config)
    model_seq = config.model.get("max_seq_len")
    if model_seq and train.seq_len > model_seq:
        raise InvalidValueError("train.seq_len", f"{train.seq_len} exceeds model.max_seq_len={model_seq}")
    if world_size is not None:
        plan = batch_plan(config, world_size)
        if train.warmup_steps >= plan.total_steps:
            raise InvalidValueError(
                "train.warmup_steps", f"{train.warmup_steps} warmup steps >= the run's {plan.total_steps} steps"
            )
