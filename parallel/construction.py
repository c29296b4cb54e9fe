"""Build a `TitansLM` already parallelised for this rank: no rank ever holds the whole model.

`build_parallel_model(model_config, parallel_config, context, seed=...)`, in this order:
1. the plain model on the meta device (shapes only, nothing allocated), and each parameter's
   initial distribution and full shape (`titans_train.model.init`);
2. `parallelize` on that meta model: tensor parallelism replaces the modules by this rank's
   shards, still on meta, and returns the `ParallelPlan`;
3. materialisation of this rank's part of every parameter, by parameter: its tp shard, or with
   ZeRO-3 only its ZeRO partition of that shard (`parallel.zero.materialise_partitioned`). The
   values come from the layout-independent rule (seed, parameter path, position), or from whole
   weights (`train.init_from`), so every layout starts from the weights of one process.

Peak memory while building: this rank's part of the model plus one parameter's tp shard (under
ZeRO-3 that shard is allocated, as address space, only for DeepSpeed's partitioning copy; only
the partition is written).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from titans_train.model.init import SeededTensor, Shard, given_tensor, initial_distributions, local_values
from titans_train.parallel.context import ParallelContext
from titans_train.parallel.parallelize import ParallelPlan, parallelize

# (start, stop) -> elements [start, stop) of this rank's flattened local tensor of one parameter
LocalValues = Callable[[int, int], torch.Tensor]


def tensor_parallel_shard(parameter: nn.Parameter, context: ParallelContext) -> Optional[Shard]:
    """Which part of the full tensor this tp rank's `parameter` holds (None: all of it)."""
    if context.tp_size == 1 or not getattr(parameter, "tensor_model_parallel", False):
        return None
    dim = parameter.partition_dim
    local = parameter.shape[dim]
    return Shard(dim, context.tp_rank * local, (context.tp_rank + 1) * local)


def _local_sources(model: nn.Module, context: ParallelContext, full_shapes: dict[str, tuple[int, ...]],
                   spans: dict[str, Callable[[int, int], torch.Tensor]]) -> dict[str, LocalValues]:
    sources = {}
    for path, parameter in model.named_parameters():
        shard = tensor_parallel_shard(parameter, context)

        def values(start: int, stop: int, span=spans[path], shape=full_shapes[path], shard=shard) -> torch.Tensor:
            return local_values(span, shape, shard, start, stop)

        sources[path] = values
    return sources


def replace_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Swap parameters by identity in every module that holds them (a tied weight sits in two)."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in new:
                module._parameters[name] = new[id(parameter)]


def materialised_like(parameter: nn.Parameter, dtype: torch.dtype, device) -> nn.Parameter:
    """An uninitialised real parameter in place of a meta one, with its attributes (tp marks)."""
    real = nn.Parameter(torch.empty(parameter.shape, dtype=dtype, device=device),
                        requires_grad=parameter.requires_grad)
    real.__dict__.update(parameter.__dict__)
    return real


def materialise(model: nn.Module, sources: dict[str, LocalValues], device, dtype: torch.dtype = torch.float32) -> None:
    """Every meta parameter of `model` becomes this rank's local tensor, filled from `sources`."""
    parameters = dict(model.named_parameters())
    new = {id(parameter): materialised_like(parameter, dtype, device) for parameter in parameters.values()}
    replace_parameters(model, new)
    with torch.no_grad():
        for path, parameter in parameters.items():
            local = new[id(parameter)]
            local.view(-1).copy_(sources[path](0, local.numel()))


def _check_materialised(model: nn.Module) -> None:
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if tensor.is_meta and tensor.numel()]
    if left:
        raise RuntimeError(f"{left} are still on the meta device after construction; "
                           "parallel/construction.py must materialise them")


def build_parallel_model(model_config, parallel_config, context: ParallelContext, *, seed: int,
                         initial_weights: Optional[dict[str, torch.Tensor]] = None,
                         zero3_config: Optional[dict] = None, device=None,
                         precision: str = "fp32") -> tuple[nn.Module, ParallelPlan]:
    """(this rank's part of a TitansLM, its plan) for the layout of `context`.

    `initial_weights`: full weights by parameter path (checked by `convert.init_from`) instead of
    the seeded rule. `zero3_config`: the DeepSpeed config of a ZeRO-3 run (its engine must get
    the same): parameters are then created partitioned over ZeRO's group, in the training
    `precision` ("fp32" | "bf16": DeepSpeed does not cast a model built partitioned). Without it
    every parameter is this rank's tp shard in fp32 on `device` (the engine casts it).
    """
    from titans_train.model import TitansLM

    with torch.device("meta"):
        model = TitansLM(model_config)
    full_shapes = {path: tuple(parameter.shape) for path, parameter in model.named_parameters()}
    if initial_weights is None:
        spans = {path: SeededTensor(distribution, seed, path, torch.Size(full_shapes[path]).numel()).span
                 for path, distribution in initial_distributions(model).items()}
    else:
        spans = {path: given_tensor(initial_weights[path]) for path in full_shapes}
    with torch.device("meta"):
        plan = parallelize(model, parallel_config, context)
    sources = _local_sources(model, context, full_shapes, spans)
    if zero3_config is not None:
        from titans_train.parallel.zero import materialise_partitioned

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        materialise_partitioned(model, context, zero3_config, sources, dtype)
    else:
        materialise(model, sources, device or torch.device("cpu"))
    _check_materialised(model)
    return model, plan


__all__ = ["build_parallel_model", "materialise", "materialised_like", "replace_parameters", "tensor_parallel_shard"]
