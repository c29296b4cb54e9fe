"""The DeepSpeed engine around a model: ZeRO 0-3, fp32 | bf16, accumulation, clipping, AdamW groups.

The optimizer is a `torch.optim.AdamW` instance handed to DeepSpeed (no JIT-compiled fused Adam,
the same arithmetic on CPU and GPU) with two parameter groups: decayed weights and the
parameters `no_weight_decay(name, param)` exempts (norms, biases, gates). The LR schedule is a
LambdaLR DeepSpeed steps once per optimizer step, so its state is in every checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig

from titans_train.config.validate import BatchPlan
from titans_train.train.schedule import build_scheduler


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     no_weight_decay: Callable[[str, torch.nn.Parameter], bool]) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(config: DictConfig, plan: BatchPlan, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config. Its data-parallel world is dp x sp (the mpu's gradient group): the sp
    ranks of a replica share their samples, so its batch size counts each sample sp times."""
    train = config.train
    zero: dict[str, Any] = {"stage": config.parallel.zero_stage}
    if config.parallel.zero_stage == 3:
        # Gather every parameter for each forward: exact and simple; the defaults prefetch
        # by size thresholds that only matter on large models.
        zero.update(stage3_param_persistence_threshold=0)
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch_samples * config.parallel.sp,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_optimizer(model: torch.nn.Module, config: DictConfig,
                    no_weight_decay: Callable[[str, torch.nn.Parameter], bool]) -> torch.optim.AdamW:
    train = config.train
    return torch.optim.AdamW(
        parameter_groups(model, train.weight_decay, no_weight_decay),
        lr=train.lr,
        betas=tuple(train.betas),
        eps=train.eps,
        # foreach=False: the same per-parameter arithmetic whatever the ZeRO partitioning.
        foreach=False,
    )


def build_engine(model: torch.nn.Module, config: DictConfig, plan: BatchPlan, context,
                 no_weight_decay: Callable[[str, torch.nn.Parameter], bool], load_universal: bool = False):
    """(engine, optimizer, scheduler) for `model`; the process group must exist."""
    import deepspeed

    optimizer = build_optimizer(model, config, no_weight_decay)
    scheduler = build_scheduler(optimizer, config.train, plan.total_steps)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, plan, load_universal=load_universal),
        mpu=context.mpu(),
        dist_init_required=False,
    )
    return engine, ds_optimizer, ds_scheduler
