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
        # A ZeRO-3 parameter built partitioned is an empty tensor; its shape is `ds_shape`.
        shaped = torch.empty(param.ds_shape, device="meta") if hasattr(param, "ds_shape") else param
        (no_decay if no_weight_decay(name, shaped) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def zero_buckets_of(config: DictConfig):
    """ZeRO's buffer sizes for this run's model and tp degree (`titans_train.parallel.zero_buckets`,
    the rule the planner uses too; `parallel.zero_bucket_elements` overrides its bucket)."""
    from titans_train.config import model_config
    from titans_train.parallel.zero_buckets import zero_buckets
    from titans_train.plan.model_facts import model_facts

    model = model_config(config)
    layer = model_facts(model, config.parallel.tp).layer_parameters_per_tp_rank
    return zero_buckets(model.dim, layer, config.parallel.zero_bucket_elements)


def deepspeed_config(config: DictConfig, plan: BatchPlan, context, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config. Its batch keys come from `parallel.zero.deepspeed_batch_settings`:
    its data-parallel world counts the sp ranks of a replica, which share their samples."""
    from titans_train.parallel.zero import deepspeed_batch_settings

    train = config.train
    stage = config.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage, **zero_buckets_of(config).deepspeed(stage)}
    if stage == 3:
        # Partition every parameter, however small: exact and simple (DeepSpeed's default keeps
        # those under 1e5 elements whole on every rank).
        zero.update(stage3_param_persistence_threshold=0)
    ds: dict[str, Any] = {
        **deepspeed_batch_settings(context, config.parallel.zero_stage, train.micro_batch_size,
                                   plan.gradient_accumulation_steps),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if train.optimizer_precision == "bf16":
            ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
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
    from titans_train.parallel.zero import initialize_engine

    optimizer = build_optimizer(model, config, no_weight_decay)
    scheduler = build_scheduler(optimizer, config.train, plan.total_steps)
    return initialize_engine(model, optimizer, deepspeed_config(config, plan, context, load_universal),
                             context, lr_scheduler=scheduler)
