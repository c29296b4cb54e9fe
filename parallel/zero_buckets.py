"""DeepSpeed ZeRO's buffer sizes, from the model: one rule for the engine and the planner.

DeepSpeed's defaults are sized for large GPUs, not for a model: a 5e8-element gradient
reduction bucket (1 GB in bf16), a 5e7-element ZeRO-3 prefetch, and ZeRO-3 keeping up to 1e9
gathered parameters alive and not releasing any it will reuse within 1e9 parameters (in
practice: most of a 1.3B model stays gathered from its forward to its backward). Here they
follow the model instead (docs/scaling.md, "ZeRO buffers"):

- reduce bucket (ZeRO-2/3 gradient reduction; ZeRO-1/2 parameter all-gather): dim^2 elements,
  Hugging Face's "auto" rule, but never below `MIN_BUCKET_ELEMENTS` (2^24, 32 MiB in bf16), so a
  GPU's collectives stay large enough to run near link bandwidth; `parallel.zero_bucket_elements`
  replaces the rule with one number;
- ZeRO-3 prefetch: 0.9 x the reduce bucket (the same rule's ratio);
- ZeRO-3 live parameters: two layers (the one running and the next, prefetched), at least two
  buckets; reuse distance: one layer, so only the last layer stays gathered across the turn from
  forward to backward;
- ZeRO-3 optimizer sub-group: one bucket of this rank's partition. DeepSpeed steps the optimizer
  one sub-group at a time, with a flattened gradient copy and Adam's temporaries the size of a
  sub-group; its default (1e9) makes that the whole partition (for mac-1.3b on 4 CPU ranks the
  first step's optimizer phase grew each rank by more than 2.5 GiB, where it was stopped, against
  1.3 GiB with this rule, Adam's moments touched for the first time).

A "layer" is one transformer block's parameters on one tp rank (`layer_parameters`), what ZeRO-3
gathers at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_BUCKET_ELEMENTS = 2**24  # 32 MiB of bf16: the smallest collective we ask a GPU to run
PREFETCH_FRACTION = 0.9


@dataclass(frozen=True)
class ZeroBuckets:
    """Element counts (not bytes) of ZeRO's buffers."""

    reduce_bucket: int
    prefetch_bucket: int
    max_live_parameters: int
    max_reuse_distance: int
    optimizer_sub_group: int

    def deepspeed(self, zero_stage: int) -> dict[str, int]:
        """The keys of DeepSpeed's `zero_optimization` section for `zero_stage`."""
        if zero_stage == 0:
            return {}
        keys = {"reduce_bucket_size": self.reduce_bucket, "allgather_bucket_size": self.reduce_bucket}
        if zero_stage == 3:
            keys = {"reduce_bucket_size": self.reduce_bucket,
                    "stage3_prefetch_bucket_size": self.prefetch_bucket,
                    "stage3_max_live_parameters": self.max_live_parameters,
                    "stage3_max_reuse_distance": self.max_reuse_distance,
                    "sub_group_size": self.optimizer_sub_group}
        return keys


def zero_buckets(dim: int, layer_parameters: int, bucket_elements: int = 0) -> ZeroBuckets:
    """ZeRO's buffer sizes for a model of width `dim` whose layer holds `layer_parameters` on one
    tp rank; `bucket_elements` > 0 (`parallel.zero_bucket_elements`) replaces the bucket rule."""
    if dim < 1 or layer_parameters < 1 or bucket_elements < 0:
        raise ValueError(f"zero_buckets: dim {dim} and layer_parameters {layer_parameters} must be >= 1 "
                         f"and bucket_elements {bucket_elements} >= 0")
    bucket = bucket_elements or max(MIN_BUCKET_ELEMENTS, dim * dim)
    return ZeroBuckets(reduce_bucket=bucket,
                       prefetch_bucket=int(PREFETCH_FRACTION * bucket),
                       max_live_parameters=max(2 * layer_parameters, 2 * bucket),
                       max_reuse_distance=layer_parameters,
                       optimizer_sub_group=bucket)


__all__ = ["MIN_BUCKET_ELEMENTS", "ZeroBuckets", "zero_buckets"]
