"""Tensor parallelism applied onto a built `TitansLM`: heads are the unit that is split.

`apply_tensor_parallel(model, context)` replaces, in place, the modules and parameters listed in
`TP_PLAN` by their shards for this rank. On a built model each shard is copied from its
unsharded weights (then every rank must hold the same model); on a model built on the meta device
nothing is allocated or copied, and `parallel/construction.py` materialises each shard by the
layout-independent rule of `titans_train.model.init`. Either way a tensor-parallel run starts
from exactly the single-process weights. The model file stays plain PyTorch; the only other
change is the head counts (`n_heads`, `n_memory_heads`) the modules read, divided by tp.

Each rank then runs its own heads end to end: projections, conv, memory (memory_scan needs no
communication), per-head norms, gates. Communication happens only where head-sharded channels
meet full-width ones: after row-parallel output projections (all-reduce), in the backward of
column-parallel inputs, and for the vocabulary.

With `sequence_sharding=True` (`parallel.tp_sequence_sharding`) the residual stream and its norms
are split along the sequence over the tp ranks instead of replicated; the layers built here then
take megatron-core's sequence-parallel arguments and `tp_sequence_sharding.py` adds the mappings
between the two regions (see its docstring).
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from titans_train.parallel.context import ParallelContext
from titans_train.parallel.megatron_cpu import install_megatron_cpu_shim
from titans_train.parallel.tp_sequence_sharding import (
    ROW_OUTPUTS,
    SequenceShardedRMSNorm,
    gather_sequence,
    sequence_sharded_embedding_class,
)

# Every parameter of a TitansLM, by path, and how it is split over the tp ranks of a layer.
# Module entries replace the module; parameter entries ("heads", "replicated") keep the module.
#   column                 ColumnParallelLinear: output features (grouped by head) split
#   row                    RowParallelLinear: input features split, output all-reduced
#   row_to_local_channels  row-parallel, then this rank's slice of the output channels
#   heads                  parameter split along dim 0 (its head or head-grouped channel dim)
#   vocab_embedding        VocabParallelEmbedding, vocabulary padded to a multiple of tp
#   vocab_head             logits for this rank's vocabulary slice (tied or its own weight)
#   replicated             every rank holds all of it (norms over the full model width)
TP_PLAN: dict[str, str] = {
    "embedding": "vocab_embedding",
    "lm_head": "vocab_head",
    "final_norm.weight": "replicated",
    "layers.*.mixer_norm.weight": "replicated",
    "layers.*.mlp_norm.weight": "replicated",
    # SwiGLU
    "layers.*.mlp.gate_proj": "column",
    "layers.*.mlp.up_proj": "column",
    "layers.*.mlp.down_proj": "row",
    # attention (transformer, swa, mag, mal, mac)
    "layers.*.mixer.attention.q_proj": "column",
    "layers.*.mixer.attention.k_proj": "column",
    "layers.*.mixer.attention.v_proj": "column",
    "layers.*.mixer.attention.persistent_keys": "heads",  # (H, N_p, d)
    "layers.*.mixer.attention.persistent_values": "heads",
    # neural memory (lmm, mac, mag, mal)
    "layers.*.mixer.memory.q_proj": "column",
    "layers.*.mixer.memory.k_proj": "column",
    "layers.*.mixer.memory.v_proj": "column",
    "layers.*.mixer.memory.q_conv.weight": "heads",  # (Hm*d, K), channels grouped by head
    "layers.*.mixer.memory.k_conv.weight": "heads",
    "layers.*.mixer.memory.v_conv.weight": "heads",
    "layers.*.mixer.memory.theta_proj": "column",  # one output per memory head
    "layers.*.mixer.memory.eta_proj": "column",
    "layers.*.mixer.memory.alpha_proj": "column",
    "layers.*.mixer.memory.initial_weights.*": "heads",  # W^0 (Hm, d_out, d_in)
    "layers.*.mixer.memory_norm.weight": "heads",  # (Hm, d), mag and mal
    "layers.*.mixer.memory_out_proj": "row",  # mal: memory heads -> attention input
    # mac: y feeds the memory (full width) and the head-local product y * M(y); see below
    "layers.*.mixer.attention_out_proj": "row_to_local_channels",
    "layers.*.mixer.y_norm.weight": "heads",  # (Hm, d): mac normalises y per memory head
    # gated output of every mixer
    "layers.*.mixer.output.norm.weight": "heads",  # (H, d)
    "layers.*.mixer.output.gate_proj": "column",
    "layers.*.mixer.output.out_proj": "row",
}
# The modules that split their input into heads, by path, and the attribute holding their head
# count: each rank's module runs 1/tp of the heads (the plan above splits their weights so).
HEAD_COUNTS: dict[str, str] = {
    "layers.*.mixer.attention": "n_heads",
    "layers.*.mixer.output": "n_heads",
    "layers.*.mixer.output.norm": "n_heads",
    "layers.*.mixer.memory": "n_memory_heads",
    "layers.*.mixer.memory_norm": "n_heads",
    "layers.*.mixer.y_norm": "n_heads",
}
MODULE_STYLES = ("column", "row", "row_to_local_channels", "vocab_embedding", "vocab_head")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Smallest multiple of tp >= vocab_size: every rank holds an equal vocabulary slice."""
    return -(-vocab_size // tp) * tp


def plan_style(path: str, plan: dict[str, str] = TP_PLAN) -> Optional[str]:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(path, pattern):
            return style
    return None


def _mark_sharded(parameter: nn.Parameter, dim: int) -> None:
    # What megatron-core and DeepSpeed read: clipping counts these once per tp shard.
    parameter.tensor_model_parallel = True
    parameter.partition_dim = dim
    parameter.partition_stride = 1


def _shard(tensor: torch.Tensor, dim: int, context: ParallelContext) -> torch.Tensor:
    return tensor.detach().chunk(context.tp_size, dim=dim)[context.tp_rank].clone()


def _megatron_config(context: ParallelContext, dtype: torch.dtype, sequence_parallel: bool = False):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=context.tp_size,
        # Weights are copied in from the unsharded model, or drawn by parallel/construction.py,
        # never by megatron; allocated on the default device (meta while constructing), which
        # only use_cpu_initialization gives: otherwise megatron names the GPU explicitly.
        perform_initialization=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        # megatron's sequence-parallel row layers reduce-scatter their output along dim 0: only
        # ever given our (T, B, D)-transposed views (RowParallelProjection below).
        sequence_parallel=sequence_parallel,
    )


def _no_init(_tensor: torch.Tensor) -> None:
    raise AssertionError("megatron-core must not initialise weights copied from the model")


def _parallel_linear_classes():
    """Subclasses of megatron-core's layers with nn.Linear's call signature (a tensor, bias added)."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        all_gather_last_dim_from_tensor_parallel_region,
        gather_from_tensor_model_parallel_region,
        scatter_to_tensor_model_parallel_region,
    )

    class ColumnParallelProjection(ColumnParallelLinear):
        """Column-parallel linear taking either the full input or this rank's channel slice.

        MAC feeds the same projections full-width tokens x and head-sharded vectors (the memory's
        retrieval h, the attention output y); a sharded input is gathered first, which is the
        same linear map of the same full vector.

        With `disable_grad_reduce` (tp sequence sharding) the input gradient is not all-reduced
        here: a full input comes from a gather along T whose backward reduce-scatters it, and a
        sharded input is gathered by a mapping whose backward reduce-scatters along channels.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != self.input_size:
                if self.disable_grad_reduce:
                    x = all_gather_last_dim_from_tensor_parallel_region(x, group=self.tp_group)
                else:
                    x = gather_from_tensor_model_parallel_region(x, group=self.tp_group)
            output, _ = super().forward(x)
            return output

    class RowParallelProjection(RowParallelLinear):
        """Row-parallel linear: head-sharded input, full (all-reduced) output.

        With megatron's `sequence_parallel` (tp sequence sharding) the output is instead
        reduce-scattered along T, (B, T/tp, D), and with `gather_sequence_output` gathered again.
        """

        scatter_output = False
        gather_sequence_output = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.sequence_parallel:
                output, _ = super().forward(x)
            else:  # megatron's sequence dimension is dim 0
                output = super().forward(x.transpose(0, 1))[0].transpose(0, 1)  # (B, T/tp, D)
                if self.gather_sequence_output:
                    output = gather_sequence(output, self.tp_group)
            if self.scatter_output:
                output = scatter_to_tensor_model_parallel_region(output, group=self.tp_group)
            return output

    return ColumnParallelProjection, RowParallelProjection


class VocabParallelHead(nn.Module):
    """Logits over this rank's vocabulary slice (B, T, V_padded / tp).

    Padding rows exist only to make the slices equal; their logits are -inf so the softmax, and
    so the loss, equal the unpadded model's.
    """

    def __init__(self, weight: nn.Parameter, vocab_size: int, vocab_start: int, tp_group,
                 reduce_input_gradient: bool = True):
        super().__init__()
        self.weight = weight  # (V_padded / tp, D), shared with the embedding when tied
        self.tp_group = tp_group
        # False under tp sequence sharding: the input was gathered along T, whose backward sums it.
        self.reduce_input_gradient = reduce_input_gradient
        # Rows at or past this one are padding (the last ranks' slices); not a buffer, so a model
        # built on the meta device (parallel/construction.py) has nothing left to materialise.
        self.real_rows = max(0, min(weight.shape[0], vocab_size - vocab_start))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        if self.reduce_input_gradient:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        logits = F.linear(hidden, self.weight)
        if self.real_rows < logits.shape[-1]:
            padding = torch.arange(logits.shape[-1], device=logits.device) >= self.real_rows
            logits = logits.masked_fill(padding, float("-inf"))
        return logits


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _check_row_outputs(model: nn.Module, plan: dict[str, str]) -> None:
    """Under tp sequence sharding every row-parallel projection needs a place in ROW_OUTPUTS, and
    none may have a bias (it would be added to a T-shard and its gradient would need summing over
    tp, which is not built; no variant has one)."""
    for path, module in model.named_modules():
        if plan_style(path, plan) != "row":
            continue
        if plan_style(path, ROW_OUTPUTS) is None:
            raise RuntimeError(f"ROW_OUTPUTS does not say where the output of {path} goes under tp "
                               "sequence sharding; add it")
        if module.bias is not None:
            raise NotImplementedError(f"{path} has a bias, which tp sequence sharding does not support")


def apply_tensor_parallel(model: nn.Module, context: ParallelContext,
                          plan: dict[str, str] = TP_PLAN, sequence_sharding: bool = False) -> None:
    """Shard `model` (a built TitansLM) in place for this rank's tp coordinate (a no-op at tp 1).

    Order: check that the plan covers every parameter, replace modules (linear layers,
    embedding, head), split per-head parameters, divide the head counts of HEAD_COUNTS, and with
    `sequence_sharding` replace the replicated norms by sequence-sharded ones. The layout was
    validated with the config (head counts divide by tp).
    """
    tp = context.tp_size
    if tp == 1:
        return
    # Before touching anything: a parameter the plan does not name would silently stay whole.
    uncovered = [path for path, _ in model.named_parameters()
                 if plan_style(path, plan) is None
                 and plan_style(path.rpartition(".")[0], plan) is None]
    if uncovered:
        raise RuntimeError(f"TP_PLAN does not say how to split {uncovered}; add them to the plan")
    if sequence_sharding:
        _check_row_outputs(model, plan)
    vocab_padded = padded_vocab_size(model.config.vocab_size, tp)
    install_megatron_cpu_shim()
    column_cls, row_cls = _parallel_linear_classes()
    dtype = model.embedding.weight.dtype
    megatron_config = _megatron_config(context, dtype)
    if sequence_sharding:
        sequence_parallel_config = _megatron_config(context, dtype, sequence_parallel=True)
        embedding_cls = sequence_sharded_embedding_class()
    else:
        from megatron.core.tensor_parallel import VocabParallelEmbedding as embedding_cls
    tied = model.lm_head.weight is model.embedding.weight

    for path, module in list(model.named_modules()):
        style = plan_style(path, plan)
        if style not in MODULE_STYLES:
            continue
        if style in ("column", "row", "row_to_local_channels"):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"TP_PLAN says {path} is {style}, but it is {type(module).__name__}")
            common = dict(config=megatron_config, init_method=_no_init, bias=module.bias is not None)
            if style == "column":
                new = column_cls(module.in_features, module.out_features, gather_output=False,
                                 skip_bias_add=False, tp_group=context.tp_group,
                                 disable_grad_reduce=sequence_sharding, **common)
                weight_dim = 0
            else:
                row_output = plan_style(path, ROW_OUTPUTS) if sequence_sharding and style == "row" else None
                if row_output is not None:
                    common["config"] = sequence_parallel_config
                new = row_cls(module.in_features, module.out_features, input_is_parallel=True,
                              skip_bias_add=False, tp_group=context.tp_group, **common)
                new.scatter_output = style == "row_to_local_channels"
                new.gather_sequence_output = row_output == "column_inputs"
                weight_dim = 1
            with torch.no_grad():
                new.weight.copy_(_shard(module.weight, weight_dim, context))
                if module.bias is not None:
                    # A row-parallel bias is added after the reduction: every rank holds all of it.
                    new.bias.copy_(_shard(module.bias, 0, context) if style == "column" else module.bias)
            _mark_sharded(new.weight, weight_dim)
            if getattr(module, "is_residual_projection", False):
                new.is_residual_projection = True
        elif style == "vocab_embedding":
            padded = vocab_padded
            new = embedding_cls(padded, module.embedding_dim, init_method=_no_init,
                                config=megatron_config, tp_group=context.tp_group,
                                reduce_scatter_embeddings=sequence_sharding)
            full = torch.zeros(padded, module.embedding_dim, dtype=dtype)
            full[: module.num_embeddings] = module.weight.detach()
            with torch.no_grad():
                new.weight.copy_(_shard(full, 0, context))
            _mark_sharded(new.weight, 0)
        else:  # vocab_head, after the embedding (named_modules lists `embedding` first)
            local = vocab_padded // tp
            if tied:
                weight = model.embedding.weight
            else:
                full = torch.zeros(vocab_padded, module.in_features, dtype=dtype)
                full[: module.out_features] = module.weight.detach()
                weight = nn.Parameter(_shard(full, 0, context))
                _mark_sharded(weight, 0)
            new = VocabParallelHead(weight, model.config.vocab_size, context.tp_rank * local,
                                    context.tp_group, reduce_input_gradient=not sequence_sharding)
        _set_submodule(model, path, new)

    for path, parameter in list(model.named_parameters()):
        if plan_style(path, plan) != "heads":
            continue
        module_path, _, name = path.rpartition(".")
        owner = model.get_submodule(module_path)
        sharded = nn.Parameter(_shard(parameter, 0, context), requires_grad=parameter.requires_grad)
        _mark_sharded(sharded, 0)
        setattr(owner, name, sharded)

    for path, module in model.named_modules():
        attribute = plan_style(path, HEAD_COUNTS)
        if attribute is not None:
            setattr(module, attribute, getattr(module, attribute) // tp)

    if sequence_sharding:
        for path, _ in list(model.named_parameters()):
            if plan_style(path, plan) == "replicated":
                module_path = path.rpartition(".")[0]
                _set_submodule(model, module_path,
                               SequenceShardedRMSNorm(model.get_submodule(module_path), context.tp_group))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tensor_parallel_size: int = 1) -> torch.Tensor:
    """Cross-entropy per token (B, T) of logits (B, T, V) or vocab-sharded logits (B, T, V/tp)."""
    if tensor_parallel_size == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none"
                               ).view(labels.shape)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels)


def unshard(model: nn.Module, context: ParallelContext,
            local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, unsharded tensors from this rank's `local` ones (same paths as the model's
    parameters, e.g. its gradients): tp shards are all-gathered, vocabulary padding is removed.
    Collective over the tp group: every rank must call it with the same paths."""
    import torch.distributed as dist

    parameters = dict(model.named_parameters())
    out = {}
    for path, value in local.items():
        parameter = parameters[path]
        if getattr(parameter, "tensor_model_parallel", False) and context.tp_size > 1:
            pieces = [torch.empty_like(value) for _ in range(context.tp_size)]
            dist.all_gather(pieces, value.contiguous(), group=context.tp_group)
            value = torch.cat(pieces, dim=parameter.partition_dim)
            if path in ("embedding.weight", "lm_head.weight"):
                value = value[: model.config.vocab_size]
        out[path] = value.detach().clone()
    return out


def gather_full_parameters(model: nn.Module, context: ParallelContext) -> dict[str, torch.Tensor]:
    """Every parameter at its full, unsharded shape, by path."""
    return unshard(model, context, {path: p.detach() for path, p in model.named_parameters()})


def gather_full_gradients(model: nn.Module, context: ParallelContext) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at full shape (zeros where a parameter got none), by path."""
    return unshard(model, context, {
        path: p.grad if p.grad is not None else torch.zeros_like(p)
        for path, p in model.named_parameters()
    })


__all__ = [
    "TP_PLAN",
    "VocabParallelHead",
    "apply_tensor_parallel",
    "gather_full_gradients",
    "gather_full_parameters",
    "padded_vocab_size",
    "plan_style",
    "token_losses",
    "unshard",
]
