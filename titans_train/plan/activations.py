"""Activation memory, counted by tracing the model on the meta device.

Activation bytes are not written as a hand formula: they are the bytes of every tensor autograd
saves for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters
excluded), recorded while one layer of the actual model code runs at the per-rank shapes on the
meta device (nothing is allocated, a 13B layer traces in well under a second). The fused
memory_scan saves all of its intermediates through `save_for_backward`, so they are seen too.
Because the count comes from the code, it cannot drift from it.

Tensor parallelism is applied to the count, not traced: each saved tensor is attributed to the
innermost module that saved it, and `TP_PLAN` says how that module is split. Tensors saved by
column-parallel projections, the vocabulary head and the replicated norms are their full-width
inputs (B, S, D), replicated over tp ranks (or split along T with `tp_sequence_sharding`);
everything else lives in head, hidden or vocabulary space and splits by tp. That rule is exact
for lmm/mag/mal/transformer's layer structure and an approximation for MAC's gathered
retrievals (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from titans_train.model import TitansConfig, TitansLM
from titans_train.parallel.tensor_parallel import plan_style

FULL_WIDTH_STYLES = ("column", "replicated", "vocab_head")


def _fused_attention(query, key, value, attn_mask=None, is_causal=False, **unused):
    """SDPA as a fused kernel runs it: saves q, k, v, the output, the log-sum-exp and the mask
    as an additive bias, never the (Tq, Tk) probabilities. On the meta device
    `F.scaled_dot_product_attention` falls back to the math path, which saves them; CPU (flash
    for CPU) and CUDA (memory-efficient attention) kernels do not."""
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.expand(*query.shape[:-2], *attn_mask.shape[-2:])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, is_causal=is_causal)[0]


@contextlib.contextmanager
def _fused_attention_on_meta():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd keeps for backward, split by how tensor parallelism divides them."""

    full_width: int  # (B, S, D) inputs of column projections and replicated norms
    sharded: int  # head / hidden / vocabulary space: divided by tp

    def per_rank(self, tp: int, tp_sequence_sharding: bool) -> float:
        full = self.full_width / tp if tp_sequence_sharding else self.full_width
        return full + self.sharded / tp


def _module_style(path: str) -> str | None:
    return plan_style(path) or plan_style(f"{path}.weight")


class _SavedTensorCounter:
    """Counts saved storages during a forward, attributed to the innermost running module."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.storages: dict[int, tuple[int, bool]] = {}  # storage id -> (bytes, full width)
        self.parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        self.handles = []
        for path, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(
                lambda module, args, path=path: self.stack.append(path)))
            self.handles.append(module.register_forward_hook(
                lambda module, args, output: self._leave()))

    def _leave(self) -> None:  # a forward hook's return value would replace the output
        self.stack.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.parameters and key not in self.storages:
            style = _module_style(self.stack[-1]) if self.stack else None
            self.storages[key] = (storage.nbytes(), style in FULL_WIDTH_STYLES)
        return tensor

    def result(self) -> SavedBytes:
        for handle in self.handles:
            handle.remove()
        full = sum(size for size, is_full in self.storages.values() if is_full)
        total = sum(size for size, _ in self.storages.values())
        return SavedBytes(full_width=full, sharded=total - full)


@dataclass(frozen=True)
class TracedActivations:
    layer: SavedBytes  # one layer's saved tensors (the last span owner's, under sp)
    head: SavedBytes  # final norm, LM head, cross-entropy
    layer_input_bytes: int  # one (B, S, D) hidden state: what a checkpointed layer keeps
    logits_bytes: int  # (B, S, V) fp32: the cross-entropy's gradient at the start of backward


def trace_activations(config: TitansConfig, micro_batch: int, span: int, sp: int,
                      dtype: torch.dtype) -> TracedActivations:
    """Saved-tensor bytes of one layer and of the head at micro batch x span tokens.

    With sp > 1 the layer is traced as the last span owner runs it (position (sp-1) x span,
    its incoming state given), where a full-attention layer's received key/value prefix is
    largest.
    """
    one_layer = replace(config, n_layers=1)
    with torch.device("meta"):
        model = TitansLM(one_layer).to(dtype)
        hidden = torch.empty(micro_batch, span, config.dim, dtype=dtype, requires_grad=True)
        labels = torch.zeros(micro_batch, span, dtype=torch.long)
    block = model.layers[0]
    position = (sp - 1) * span
    state = None if position == 0 else block.empty_state(micro_batch, position, "meta", dtype)
    counter = _SavedTensorCounter(model)
    with _fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out, _ = block(hidden, state, position)
    layer = counter.result()
    counter = _SavedTensorCounter(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        logits = model.final_logits(out.detach().requires_grad_())
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    head = counter.result()
    element = torch.empty((), dtype=dtype).element_size()
    return TracedActivations(layer=layer, head=head,
                             layer_input_bytes=micro_batch * span * config.dim * element,
                             logits_bytes=micro_batch * span * config.vocab_size * 4)
