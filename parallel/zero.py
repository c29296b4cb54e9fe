"""DeepSpeed ZeRO under sequence parallelism: keep ZeRO's collectives out of the wavefront.

Span owners reach a layer at different times (the wavefront of `sequence_parallel.py`), so any
collective that spans several sp ranks and is issued *inside* forward or backward deadlocks: rank
r waits in it for rank r+1, which waits in a relay receive for rank r. DeepSpeed issues two kinds
of such collectives:

- gradient reductions during backward: ZeRO-2 and ZeRO-3 reduce a bucket as soon as it fills
  (any model larger than `reduce_bucket_size`, 5e8 elements by default), ZeRO-1 and -2 with
  `overlap_comm` at the accumulation boundary;
- ZeRO-3's parameter all-gathers, in every layer's forward and backward.

With sp > 1, `optimizer_step` therefore runs the micro-steps of one optimizer step inside
DeepSpeed's `engine.coalesce_grad_reduction()`: gradients accumulate locally and are reduced once,
after the last backward, when every rank has left the wavefront. DeepSpeed then sees one
micro-batch per step (its `gradient_accumulation_steps` is 1, see `deepspeed_batch_settings`) and
the objective is scaled by 1 / accumulation here. Stage 0 and DeepSpeed's bf16 wrappers have no
coalescing and need none: they reduce after backward.

For ZeRO-3 with sp > 1 DeepSpeed's data-parallel group is dp only (`zero_partitions_over_sp`): the
ranks that gather each other's parameter shards then sit at the same span position and run in
lockstep. Parameters and optimizer state are sharded over dp and replicated over the sp ranks of
a replica (the memory cost of this layout), and the sp average of the gradients happens here,
between the last backward and DeepSpeed's reduction over dp. The sp replicas would write the
same ZeRO checkpoint files; `titans_train.train.checkpoint.assign_checkpoint_writers` lets only
sp rank 0 write them, and on load every replica reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from titans_train.parallel.context import ParallelContext

def zero_partitions_over_sp(zero_stage: int, sp: int) -> bool:
    """Whether ZeRO's data-parallel group (sharding and gradient averaging) includes the sp ranks."""
    return not (zero_stage == 3 and sp > 1)


def deepspeed_data_parallel_size(context: ParallelContext, zero_stage: int) -> int:
    dp, sp = context.data_world_size, context.sp_size
    return dp * sp if zero_partitions_over_sp(zero_stage, sp) else dp


def deepspeed_batch_settings(context: ParallelContext, zero_stage: int, micro_batch_size: int,
                             accumulation_steps: int) -> dict[str, int]:
    """DeepSpeed's batch keys. Its data-parallel world counts the sp ranks of a replica (they
    share their samples) unless ZeRO-3 shards over dp only; with sp > 1 accumulation is ours."""
    deepspeed_accumulation = accumulation_steps if context.sp_size == 1 else 1
    return {
        "train_batch_size": micro_batch_size * deepspeed_accumulation
        * deepspeed_data_parallel_size(context, zero_stage),
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": deepspeed_accumulation,
    }


def initialize_engine(model: torch.nn.Module, optimizer, config: dict[str, Any], context: ParallelContext,
                      lr_scheduler=None):
    """`deepspeed.initialize` with the mpu for this layout and ZeRO stage: (engine, optimizer,
    scheduler). `config` must hold the keys of `deepspeed_batch_settings`."""
    import deepspeed
    from deepspeed.utils import groups

    zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
    mpu = context.mpu(partition_over_sp=zero_partitions_over_sp(zero_stage, context.sp_size))
    # DeepSpeed keeps the last engine's mpu in a module global and only ever sets it: a later
    # pure data-parallel engine in the same process (mpu None) would shard by the old layout's
    # groups and write its ZeRO files for them.
    groups.mpu = mpu
    engine, deepspeed_optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config, mpu=mpu,
        dist_init_required=False,
    )
    if zero_stage == 3:
        _register_initial_state_parameters(engine.module)
    return engine, deepspeed_optimizer, scheduler


def materialise_partitioned(model: torch.nn.Module, context: ParallelContext, config: dict[str, Any],
                            sources: dict[str, Callable[[int, int], torch.Tensor]], dtype: torch.dtype) -> None:
    """Create every (meta) parameter of `model` as a ZeRO-3 parameter holding only this rank's
    partition, written from `sources[path](start, stop)` (elements of the flattened local tensor).

    What `deepspeed.zero.Init` does to a model built inside it, one parameter at a time, over
    the group the engine will use (`config` and the mpu are the engine's), minus its broadcast of
    each whole parameter from rank 0: that broadcast only makes the ranks agree, and the values
    here are drawn by a layout-independent rule (or read from the same weights) on every rank.
    The full-shape tensor DeepSpeed partitions from is allocated but never written, so on CPU it
    stays address space; only the partition is written, at DeepSpeed's own offset for this rank.
    """
    import deepspeed

    from titans_train.parallel.construction import materialised_like, replace_parameters

    class PartitionWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    mpu = context.mpu(partition_over_sp=zero_partitions_over_sp(3, context.sp_size))
    # No `dtype`: with one, DeepSpeed 0.19's _set_dtype ignores the config (CPU-NOTES).
    group = mpu.get_data_parallel_group() if mpu is not None else None  # None: the world, as the engine's
    init = PartitionWithoutBroadcast(data_parallel_group=group, config_dict_or_path=config, mpu=mpu)
    if init.mem_efficient_linear:
        # What zero.Init does around a model built inside it (and the engine when it partitions a
        # whole model), which this path skips: F.linear becomes DeepSpeed's linear that saves the
        # weight parameter for backward, not the `weight.t()` view torch's saves. A saved view
        # keeps the gathered weight alive after ZeRO-3 releases the parameter, so the whole
        # model would stay gathered from its forward to its backward on every rank. Process-wide,
        # as DeepSpeed does it; the same arithmetic as F.linear (memory_efficient_linear: false
        # in the ZeRO config turns it off).
        init._enable_mem_efficient_linear()
    for path, parameter in dict(model.named_parameters()).items():
        local = materialised_like(parameter, dtype, init.local_device)
        replace_parameters(model, {id(parameter): local})
        init._convert_to_zero_parameters([local])
        partition = local.ds_tensor
        if partition.ds_numel * dist.get_world_size(group=local.ds_process_group) != local.ds_numel_aligned:
            raise RuntimeError(f"{path}: ZeRO-3 partitioned it other than in equal slices over its group "
                               "(hpZ or MiCS settings?), which materialise_partitioned does not know how to fill")
        start = partition.ds_numel * dist.get_rank(group=local.ds_process_group)
        valid = max(0, min(partition.ds_numel, local.ds_numel - start))
        with torch.no_grad():
            partition[:valid].copy_(sources[path](start, start + valid))
            partition[valid:].zero_()


def _register_initial_state_parameters(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 that the parameters a layer builds its initial state from (the memory's W^0,
    held in an `nn.ParameterList`) belong to that layer.

    ZeRO-3 gathers a module's own parameters when the module runs. A parameter container has no
    forward, so its parameters would be gathered on first access and only then registered with
    the module running at that moment. Only the first span owner builds an initial state, so the
    span owners' lists of gathered parameters would differ, which ZeRO-3 refuses (it checks them
    across all ranks). Registered with the layer (the outermost module with `initial_state`),
    they are gathered while the layer runs, on every span owner alike.
    """
    from deepspeed.runtime.zero import register_external_parameter

    covered: set[int] = set()
    for module in model.modules():  # pre-order: a layer comes before its mixer and memory
        if id(module) in covered or not hasattr(module, "initial_state"):
            continue
        for submodule in module.modules():
            covered.add(id(submodule))
            if isinstance(submodule, (torch.nn.ParameterList, torch.nn.ParameterDict)):
                for parameter in submodule.parameters():
                    register_external_parameter(module, parameter)


def _average_over_sp(model: torch.nn.Module, context: ParallelContext) -> None:
    """Mean of every gradient over the sp group, one all-reduce per dtype.

    Runs on gradients DeepSpeed holds back (coalesced) at full shape; a parameter only some span
    owners used (the memory's W^0 shapes only the first span) counts as zero elsewhere.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        if parameter.grad is None:
            # A ZeRO-3 parameter's tensor is its (often empty) partition while its gradient is
            # full-size until DeepSpeed reduces it; `.data` skips autograd's shape check, as
            # DeepSpeed's own gradient handling does.
            parameter.grad = torch.zeros_like(parameter)
            parameter.grad.data = torch.zeros(getattr(parameter, "ds_shape", parameter.shape),
                                              dtype=parameter.dtype, device=parameter.device)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for parameter in parameters:
        by_dtype.setdefault(parameter.grad.dtype, []).append(parameter)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, group=context.sp_group)
        flat.div_(context.sp_size)
        for parameter, piece in zip(group, flat.split([p.grad.numel() for p in group])):
            parameter.grad.copy_(piece.view_as(parameter.grad))


@contextlib.contextmanager
def _reductions_after_backward(engine, context: ParallelContext):
    if not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
        yield  # stage 0 and the bf16 wrappers reduce in backward's epilogue, after the wavefront
        return
    with engine.coalesce_grad_reduction():
        yield
        if not zero_partitions_over_sp(engine.zero_optimization_stage(), context.sp_size):
            _average_over_sp(engine.module, context)


@dataclass(frozen=True)
class OptimizerStep:
    loss: float  # mean token loss of the global batch (every micro-batch, every replica)
    grad_norm: float | None  # the global gradient norm before clipping (None: DeepSpeed gave none)


def _replicated_grad_norm(model: torch.nn.Module) -> float:
    """The gradient norm when every rank holds all (averaged) gradients: ZeRO-0 without tp."""
    squares = [p.grad.detach().float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def _after_backward(engine, replicated: bool, inspect_gradients) -> float | None:
    if inspect_gradients is not None:
        inspect_gradients()
    return _replicated_grad_norm(engine.module) if replicated else None


def optimizer_step(engine, plan, micro_batches: Sequence[torch.Tensor],
                   inspect_gradients: Callable[[], None] | None = None) -> OptimizerStep:
    """Forward and backward of every micro-batch of one optimizer step, then the step.

    `engine` wraps a `ParallelObjective` with `plan`; each micro-batch is this replica's (B, T+1)
    token block. The pre-clipping gradient norm is DeepSpeed's where it computes one (ZeRO >= 1,
    and every layout with tp > 1), else taken from the whole gradients after the last backward.
    `inspect_gradients` (tests, diagnostics) runs at that same point: gradients reduced, not
    yet consumed by the optimizer.
    """
    context = plan.context
    replicated = engine.zero_optimization_stage() == 0 and context.tp_size == 1
    losses, grad_norm = [], None
    if context.sp_size == 1:  # DeepSpeed's own accumulation: it steps at its boundary
        for index, tokens in enumerate(micro_batches):
            step = engine(tokens)
            engine.backward(step.objective)
            step.relay.finish()
            losses.append(step.loss)
            if index == len(micro_batches) - 1:
                grad_norm = _after_backward(engine, replicated, inspect_gradients)
            engine.step()
    else:
        scale = 1.0 / len(micro_batches)
        with _reductions_after_backward(engine, context):
            for tokens in micro_batches:
                step = engine(tokens)
                engine.backward(step.objective * scale)
                step.relay.finish()
                losses.append(step.loss)
        grad_norm = _after_backward(engine, replicated, inspect_gradients)
        engine.step()
    if grad_norm is None:
        reported = engine.get_global_grad_norm()
        grad_norm = float(reported) if reported is not None else None
    loss = float(torch.stack([loss.detach().double().cpu() for loss in losses]).mean())
    return OptimizerStep(loss=loss, grad_norm=grad_norm)


__all__ = [
    "OptimizerStep",
    "deepspeed_batch_settings",
    "deepspeed_data_parallel_size",
    "initialize_engine",
    "materialise_partitioned",
    "optimizer_step",
    "zero_partitions_over_sp",
]
