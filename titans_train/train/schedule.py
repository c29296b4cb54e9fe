"""Learning-rate schedules as a function of the optimizer step: warmup, then cosine | wsd | constant.

`lr_at(step)` is the lr used by optimizer step `step` (0-based). Warmup rises linearly from
lr/warmup_steps to lr. After warmup:
- cosine: from lr down to min_lr at the last step, half a cosine period;
- wsd (warmup-stable-decay): lr until the last `decay_fraction` of the steps, then linear to min_lr;
- constant: lr.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(decay_steps - 1, 1), 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_len = max(int(round(decay_fraction * decay_steps)), 1)
        decay_start = total_steps - decay_len
        if step < decay_start:
            return lr
        progress = min((step - decay_start + 1) / decay_len, 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, train_config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step (DeepSpeed steps it; its state is checkpointed).

    Every param group is built with lr = train.lr, so the multiplier is lr_at / train.lr.
    """
    kwargs = dict(
        lr=train_config.lr,
        min_lr=train_config.min_lr,
        warmup_steps=train_config.warmup_steps,
        total_steps=total_steps,
        schedule=train_config.schedule,
        decay_fraction=train_config.decay_fraction,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **kwargs) / train_config.lr)


def apply_schedule_at_current_step(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every param group's lr to this run's schedule at the scheduler's step.

    A scheduler loaded from a checkpoint carries, in its state and in the optimizer's groups,
    the lr the checkpoint's run computed for the next step from *its* total steps; a run resumed
    with another `train.steps` would take one step at that stale lr. The schedule functions
    themselves are this run's (LambdaLR never restores them from a checkpoint).
    """
    lrs = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
