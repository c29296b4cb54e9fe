"""Sequence-sharded norm regions under tensor parallelism (`parallel.tp_sequence_sharding`).

Megatron calls this `sequence_parallel`; here that name means the span relay between sp ranks,
so the option is called tp sequence sharding. Inside a tp group, everything outside the
tensor-parallel regions (the residual stream, the pre-mixer / pre-MLP RMSNorms, the final norm)
is split along the sequence over the tp ranks instead of replicated: tp rank r of a span of S
tokens holds tokens [r*S/tp, (r+1)*S/tp) of the hidden states (B, S/tp, D).

Where the two regions meet (each a megatron-core mapping, applied to a (T, B, ...) transposed view
because megatron's sequence dimension is dim 0 and ours is dim 1):
- embedding: the vocab-parallel partial sums are reduce-scattered along T (not all-reduced);
- norm -> tp region: the norm runs on the T-shard and its output is all-gathered along T once,
  then fed to every column-parallel projection of the mixer (or MLP, or the vocab head); those
  projections do not reduce their input gradient (megatron's `disable_grad_reduce`), because the
  gather's backward reduce-scatters the summed gradient;
- tp region -> residual: the row-parallel output projections reduce-scatter along T instead of
  all-reducing, so the residual add happens on shards (`ROW_OUTPUTS`);
- replicated norm weights see only a T-shard per rank: their gradient is summed over tp inside
  the graph (megatron's copy_to_tensor_model_parallel_region on the weight: identity forward,
  all-reduce backward), so every tp rank holds the full gradient in lockstep;
- saving for backward: inside `regather_norm_outputs` (entered by `parallel_loss`) a gathered
  norm output that autograd saves (the projections need it for their weight gradients) is kept
  as this rank's T-shard and all-gathered again when backward first needs it, as Megatron does.

Mixers always see their whole span (B, S, D): layer states, the sp relay and the memory are
unaffected. gloo supports reduce_scatter_tensor and all_gather_into_tensor on CPU (checked with
torch 2.13), so megatron's mappings run unchanged; the only CPU shim needed is the existing
`torch.cuda.current_device()` one in `megatron_cpu.py`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from titans_train.model.layers import RMSNorm, rms_normalize
from titans_train.parallel.layout import ParallelConfigError

# Where each row-parallel projection's output goes when the norm regions are sequence-sharded:
#   residual       reduce-scattered along T and added to the T-sharded residual stream
#   column_inputs  reduce-scattered and all-gathered again along T (an all-reduce both ways): its
#                  consumers are column-parallel projections, which no longer reduce their input
#                  gradient, so the gather's backward must sum it (mal: memory -> attention)
ROW_OUTPUTS: dict[str, str] = {
    "layers.*.mixer.output.out_proj": "residual",
    "layers.*.mlp.down_proj": "residual",
    "layers.*.mixer.memory_out_proj": "column_inputs",
}


def gather_sequence(shard: torch.Tensor, tp_group) -> torch.Tensor:
    """(B, T/tp, ...) -> (B, T, ...), all-gathered along T; backward reduce-scatters the
    gradient (the consumers are tensor-parallel, each rank's gradient is a partial sum)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    gathered = gather_from_sequence_parallel_region(shard.transpose(0, 1), group=tp_group)
    # One copy back to (B, T, ...) memory order here, instead of one in each of the projections
    # that read it (a no-op for B = 1).
    return gathered.transpose(0, 1).contiguous()


class _SavedAsShard:
    """A gathered norm output (B, T, D) as autograd keeps it for backward: this rank's T-shard,
    all-gathered again the first time backward needs it and shared by every projection that
    saved it (Megatron re-gathers the same way), so the whole (B, T, D) is not kept from
    forward to backward. The re-gather is the forward's all-gather of the same shard, so the
    values are bit-identical."""

    def __init__(self, shard: torch.Tensor, tp_group):
        self.shard = shard
        self.tp_group = tp_group
        self.gathered: torch.Tensor | None = None

    def unpack(self, size, stride, offset) -> torch.Tensor:
        if self.gathered is None:
            with torch.no_grad():
                self.gathered = gather_sequence(self.shard, self.tp_group)
        return self.gathered.as_strided(size, stride, offset)


# Storage address of a live gathered norm output -> (weak reference to it, its saved form);
# filled by SequenceShardedRMSNorm while `regather_norm_outputs` is active.
_GATHERED: dict[int, tuple[weakref.ref, _SavedAsShard]] = {}
_regathering = False


def _pack(tensor: torch.Tensor):
    entry = _GATHERED.get(tensor.untyped_storage().data_ptr())
    if entry is None or entry[0]() is None or tensor.dtype != entry[1].shard.dtype:
        return tensor
    # A view of the gathered output (e.g. matmul's flattened input): keep its geometry.
    return entry[1], tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    saved, size, stride, offset = packed
    return saved.unpack(size, stride, offset)


@contextlib.contextmanager
def regather_norm_outputs() -> Iterator[None]:
    """Within it, autograd saves each gathered norm output as its T-shard (`_SavedAsShard`).

    Enter it around a whole forward, outside any activation checkpointing (whose own, inner
    hooks then take precedence for the layers they recompute anyway)."""
    global _regathering
    if _regathering:  # nested: the outer context already does it
        yield
        return
    _regathering = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _regathering = False


def _register_gathered(gathered: torch.Tensor, shard: torch.Tensor, tp_group) -> None:
    key = gathered.untyped_storage().data_ptr()
    _GATHERED[key] = (weakref.ref(gathered), _SavedAsShard(shard.detach(), tp_group))
    weakref.finalize(gathered, _GATHERED.pop, key, None)


def check_sequence_divides(seq_len: int, tp_size: int) -> None:
    """A clear error instead of megatron's assertion when a call's T does not split over tp."""
    if seq_len % tp_size:
        raise ParallelConfigError(
            "parallel.tp_sequence_sharding",
            f"the norm regions split each call's {seq_len} tokens over tp = {tp_size} ranks; pass "
            f"a sequence (span) length divisible by {tp_size}, or turn the option off (e.g. for "
            "token-by-token decoding)")


class SequenceShardedRMSNorm(RMSNorm):
    """RMSNorm of this rank's T-shard (B, T/tp, D) whose output is gathered to (B, T, D).

    The weight is the unsharded model's parameter (same path, same object); each rank's use
    passes through megatron's copy_to_tensor_model_parallel_region, so its gradient is summed
    over the tp ranks in backward.
    """

    def __init__(self, norm: RMSNorm, tp_group):
        if type(norm) is not RMSNorm:
            raise TypeError(f"tp sequence sharding shards the RMSNorms outside the tp regions; a "
                            f"replicated parameter belongs to a {type(norm).__name__}")
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.tp_group = tp_group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        weight = copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        shard = rms_normalize(hidden, self.eps) * weight  # (B, T/tp, D)
        gathered = gather_sequence(shard, self.tp_group)  # (B, T, D)
        if _regathering and torch.is_grad_enabled():
            _register_gathered(gathered, shard, self.tp_group)
        return gathered


def sequence_sharded_embedding_class():
    """megatron-core's VocabParallelEmbedding with `reduce_scatter_embeddings=True`, returning our
    (B, T/tp, D) layout (megatron's output is (T/tp, B, D))."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class SequenceShardedVocabEmbedding(VocabParallelEmbedding):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            check_sequence_divides(input_ids.shape[1], self.tp_group.size())
            return super().forward(input_ids).transpose(0, 1)  # (B, T/tp, D)

    return SequenceShardedVocabEmbedding


__all__ = [
    "ROW_OUTPUTS",
    "SequenceShardedRMSNorm",
    "check_sequence_divides",
    "gather_sequence",
    "regather_norm_outputs",
    "sequence_sharded_embedding_class",
]
