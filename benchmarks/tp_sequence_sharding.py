"""`parallel.tp_sequence_sharding` off vs on at tp = 2: activation bytes, collectives, step time.

    .venv/bin/python -W ignore benchmarks/tp_sequence_sharding.py [--variant lmm] [--repeats 5]

One world of 2 gloo processes (tp = 2, sp = dp = 1) builds the same model twice from one seed,
once with the option off and once on, and for each reports, per rank:
- saved-activation bytes: every tensor autograd keeps for backward during one training forward
  (torch.autograd.graph.saved_tensors_hooks), counted once per storage, parameters excluded;
  under tp sequence sharding a gathered norm output is kept as its T-shard and counted so;
  tensors an autograd Function stores on its ctx directly are not seen (the same in both runs);
- the same with activation checkpointing: the tensors saved outside the checkpointed layers
  plus the layer inputs the checkpoints keep (hidden states entering each block, from hooks);
- the residual stream itself: bytes of the hidden states entering the blocks and the final norm;
- elements moved by the tp collectives per step (all-reduce, all-gather, reduce-scatter);
- the median step time (forward + backward) over `--repeats` steps after a warm-up, off and on
  interleaved, and their ratio; and the median CPU time of a step per process (less sensitive to
  other jobs on a shared machine than wall time, but it includes gloo's busy waiting).

On a 2-core machine the step time is about the mechanism (two processes share the cores), not
about a GPU's speed; the byte counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# The multi-process launcher shared with the tests (fresh spawned processes on gloo, timeouts).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from distributed import run_distributed  # noqa: E402

TP = 2


def model_config(variant: str, dim: int):
    from titans_train.model import TitansConfig

    return TitansConfig(variant=variant, vocab_size=256, dim=dim, n_layers=4, n_heads=4,
                        chunk_size=16, segment_len=32, window=32, n_persistent=4, memory_depth=2,
                        memory_expansion=2)


def _count_collectives() -> dict[str, int]:
    """Patch torch.distributed so each tp collective adds the elements of its full tensor."""
    counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    original = {name: getattr(dist, name) for name in
                ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")}

    def counted(name, key, full_tensor_argument):
        def call(*args, **kwargs):
            counts[key] += args[full_tensor_argument].numel()
            return original[name](*args, **kwargs)
        return call

    dist.all_reduce = counted("all_reduce", "all_reduce", 0)
    dist.all_gather_into_tensor = counted("all_gather_into_tensor", "all_gather", 0)  # output
    dist.reduce_scatter_tensor = counted("reduce_scatter_tensor", "reduce_scatter", 1)  # input
    # megatron-core bound the functions at import: point its module-level names at the counters.
    from megatron.core.tensor_parallel import layers, mappings

    for module in (mappings, layers):
        module.dist_all_gather_func = dist.all_gather_into_tensor
        module.dist_reduce_scatter_func = dist.reduce_scatter_tensor
    return counts


def saved_activation_bytes(model, forward) -> int:
    """Bytes of the distinct storages autograd keeps for backward during `forward()`, parameters
    excluded: tensors saved as they are, and, for a gathered norm output under tp sequence
    sharding, the T-shard its pack hook keeps instead (seen by wrapping that hook, which is the
    innermost one inside `parallel_loss`)."""
    from titans_train.parallel import tp_sequence_sharding as sharding

    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        count(tensor)
        return tensor

    def sharding_pack(tensor):
        packed = original_pack(tensor)
        count(packed if isinstance(packed, torch.Tensor) else packed[0].shard)
        return packed

    original_pack, sharding._pack = sharding._pack, sharding_pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = forward()
    finally:
        sharding._pack = original_pack
    del result
    return sum(storages.values())


def input_bytes(modules, forward) -> int:
    """Bytes of the first input of each of `modules` during `forward()`."""
    sizes = []
    handles = [m.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].numel() * args[0].element_size()))
        for m in modules]
    forward()
    for handle in handles:
        handle.remove()
    return sum(sizes)


def run(variant: str, dim: int, batch: int, seq_len: int, repeats: int):
    from titans_train.config.schema import ParallelConfig
    from titans_train.model import TitansLM
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.parallelize import parallel_loss, parallelize

    context = ParallelContext.initialize(tp=TP, sp=1)
    config = model_config(variant, dim)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    models, plans = {}, {}
    for sharded in (False, True):
        torch.manual_seed(0)
        models[sharded] = TitansLM(config)
        plans[sharded] = parallelize(models[sharded], ParallelConfig(tp=TP, tp_sequence_sharding=sharded), context)
    counts = _count_collectives()
    results = {}
    for sharded, model in models.items():
        plain, checkpointed = plans[sharded], dataclasses.replace(plans[sharded], activation_checkpointing=True)

        def forward(checkpointing=False):
            return parallel_loss(model, tokens, checkpointed if checkpointing else plain).objective

        counts.update(all_reduce=0, all_gather=0, reduce_scatter=0)
        step = parallel_loss(model, tokens, plain)
        step.objective.backward()
        step.relay.finish()
        model.zero_grad(set_to_none=True)
        results[sharded] = dict(
            collectives=dict(counts),
            saved=saved_activation_bytes(model, forward),
            # Checkpointed layers save nothing (their own, inner hooks); they keep their inputs.
            saved_checkpointed=(saved_activation_bytes(model, lambda: forward(True))
                                + input_bytes(model.layers, lambda: forward(True))),
            residual=input_bytes(list(model.layers) + [model.final_norm], forward),
            times=[], cpu_times=[])
    for _ in range(repeats + 1):  # off and on interleaved, first round a warm-up
        for sharded, model in models.items():
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            step = parallel_loss(model, tokens, plans[sharded])
            step.objective.backward()
            step.relay.finish()
            results[sharded]["times"].append(time.perf_counter() - start)
            results[sharded]["cpu_times"].append(time.process_time() - cpu_start)
            model.zero_grad(set_to_none=True)
    for result in results.values():
        result["median_s"] = statistics.median(result.pop("times")[1:])
        result["cpu_s"] = statistics.median(result.pop("cpu_times")[1:])
    ParallelContext.destroy()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lmm")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = model_config(args.variant, args.dim)
    print(f"# variant={args.variant} dim={config.dim} layers={config.n_layers} heads={config.n_heads} "
          f"batch={args.batch} seq_len={args.seq_len} tp={TP} fp32, gloo, 1 thread per process")
    records = run_distributed(run, world_size=TP, timeout_s=900, variant=args.variant, dim=args.dim,
                              batch=args.batch, seq_len=args.seq_len, repeats=args.repeats)
    mib = 2.0 ** 20
    print("| tp_sequence_sharding | saved activations MiB/rank | with activation checkpointing "
          "| residual stream MiB/rank | all-reduce elems | all-gather elems | reduce-scatter elems "
          "| step s (median, slowest rank) | CPU s per step (mean over ranks) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sharded in (False, True):
        rank0 = records[0][sharded]
        step_s = max(r[sharded]["median_s"] for r in records)
        cpu_s = statistics.mean(r[sharded]["cpu_s"] for r in records)
        c = rank0["collectives"]
        print(f"| {'on' if sharded else 'off'} | {rank0['saved'] / mib:.2f} | "
              f"{rank0['saved_checkpointed'] / mib:.2f} | {rank0['residual'] / mib:.2f} | "
              f"{c['all_reduce']} | {c['all_gather']} | {c['reduce_scatter']} | {step_s:.3f} | {cpu_s:.3f} |")
    off, on = records[0][False], records[0][True]
    ratio = max(r[True]["median_s"] for r in records) / max(r[False]["median_s"] for r in records)
    print(f"on / off: saved activations {on['saved'] / off['saved']:.2f}, with checkpointing "
          f"{on['saved_checkpointed'] / off['saved_checkpointed']:.2f}, residual stream "
          f"{on['residual'] / off['residual']:.2f}, step time {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
