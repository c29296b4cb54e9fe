"""Tensor and sequence parallelism on this machine: step time, bytes sent, wavefront idle time.

    .venv/bin/python benchmarks/parallel.py [--variant lmm] [--repeats 5]

For each layout (tp, sp) in {(1,1), (1,2), (1,4), (2,1), (2,2)} a world of tp x sp gloo processes
(dp = 1) runs forward + backward of `parallel_loss` on the same global batch, and reports:
- the median step time over `--repeats` steps (after one warm-up), and its ratio to tp = sp = 1
  measured in the same run;
- bytes each rank sends through the sequence-parallel relay per step (states forward, their
  gradients backward), measured by the relay, against the analytic count from the config;
- the tensor-parallel collectives per step (all-reduce / all-gather elements, counted on
  torch.distributed), against the analytic count for the variant;
- the measured idle fraction of the wavefront (time blocked in relay receives / step time, mean
  over ranks) against the model (P-1)/(L+P-1).
Then the op-level comparison of the two sequence-parallel memory_scans for linear memory:
the relay (sequential over spans) and the scan over ranks (affine maps).
With `--sp-schedules`, only the model step under `parallel.sp_schedule` relay vs scan (lmm,
memory_depth 1) at sp = 2 and 4.

Numbers from a 2-core machine with several processes per core are about the mechanism, not
about speed: compute is oversubscribed whenever the world exceeds 2.
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

BATCH, SEQ_LEN = 2, 256
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)]


def model_config(variant: str):
    from titans_train.model import TitansConfig

    return TitansConfig(variant=variant, vocab_size=256, dim=64, n_layers=4, n_heads=4,
                        chunk_size=16, segment_len=32, window=32, n_persistent=4, memory_depth=2,
                        memory_expansion=2)


def analytic_relay_bytes(config, tp: int, sp: int, sp_rank: int, batch: int, seq_len: int) -> int:
    """Bytes one rank sends through the relay per step, from the config alone (fp32).

    Forward (ranks 0..P-2): each layer's state at its span end; backward (ranks 1..P-1): the
    gradient of the state it received, of the same size. Per layer, per sequence, this tp shard:
    memory: weights + momentum of every memory-MLP layer (Hm/tp heads), 3 conv tails
    (Hm/tp * d * (K-1)); attention: the key/value tail (window - 1 tokens, or the whole prefix for
    full attention); mac: also its separate retrieval conv tail. Spans are block-aligned, so the
    open-block parts are empty.
    """
    span = seq_len // sp
    heads, memory_heads = config.n_heads // tp, config.memory_heads // tp
    d_att, d_mem = config.head_dim, config.memory_head_dim

    def state_elements(position: int) -> int:
        elements = 0
        if config.has_memory:
            widths = [d_mem] + [config.memory_expansion * d_mem] * (config.memory_depth - 1) + [d_mem]
            matrices = sum(i * o for i, o in zip(widths[:-1], widths[1:]))
            elements += 2 * memory_heads * matrices  # weights + momentum
            conv_tails = 4 if config.variant == "mac" else 3
            elements += conv_tails * memory_heads * d_mem * (config.conv_kernel - 1)
        if config.variant in ("transformer", "swa", "mag", "mal"):
            window = config.attention_window
            cached = position if window is None else min(position, window - 1)
            elements += 2 * heads * cached * d_att
        return batch * elements

    sent = 0
    if sp_rank < sp - 1:
        sent += config.n_layers * state_elements((sp_rank + 1) * span)
    if sp_rank > 0:
        sent += config.n_layers * state_elements(sp_rank * span)
    return 4 * sent


def _count_collectives():
    """Patch torch.distributed so each all_reduce / all_gather adds its element count."""
    counts = {"all_reduce": 0, "all_gather": 0}
    original_all_reduce, original_all_gather = dist.all_reduce, dist.all_gather_into_tensor

    def all_reduce(tensor, *args, **kwargs):
        counts["all_reduce"] += tensor.numel()
        return original_all_reduce(tensor, *args, **kwargs)

    def all_gather_into_tensor(output, tensor, *args, **kwargs):
        counts["all_gather"] += output.numel()
        return original_all_gather(output, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather_into_tensor = all_reduce, all_gather_into_tensor
    return counts


def analytic_tp_all_reduce_elements(config, batch: int, span: int) -> int:
    """All-reduced elements per step under tp (lmm; no sequence-parallel norms).

    Forward: the embedding (one (B, S, D)), per layer the mixer out_proj and the MLP down_proj
    (row-parallel); the vocab-parallel cross-entropy reduces 3 (B, S) tensors. Backward: every
    column-parallel projection all-reduces the gradient of its (B, S, D) input: per lmm layer the
    memory's q, k, v, theta, eta, alpha, the output gate, MLP gate and up = 9; and the LM head.
    Plus one element: the reported loss, summed over the gradient group.
    """
    if config.variant != "lmm":
        raise ValueError("the analytic tp count is written out for lmm")
    activation = batch * span * config.dim
    forward = activation + config.n_layers * 2 * activation + 3 * batch * span
    backward = config.n_layers * 9 * activation + activation
    return forward + backward + 1


def run_layout(variant: str, tp: int, sp: int, repeats: int):
    from titans_train.model import TitansLM
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.parallelize import parallel_loss, parallelize

    context = ParallelContext.initialize(tp=tp, sp=sp)
    torch.manual_seed(0)
    config = model_config(variant)
    model = TitansLM(config)
    plan = parallelize(model, None, context)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(1))
    counts = _count_collectives()
    times, idle, relay_bytes, collective = [], [], [], []
    for repeat in range(repeats + 1):
        counts.update(all_reduce=0, all_gather=0)
        dist.barrier()
        start = time.perf_counter()
        step = parallel_loss(model, tokens, plan)
        step.objective.backward()
        step.relay.finish()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if repeat == 0:
            continue  # warm-up
        times.append(elapsed)
        idle.append(step.relay.wait_seconds / elapsed)
        relay_bytes.append(step.relay.bytes_sent)
        collective.append(dict(counts))
    analytic = analytic_relay_bytes(config, tp, sp, context.sp_rank, BATCH, SEQ_LEN)
    expected_tp = (analytic_tp_all_reduce_elements(config, BATCH, SEQ_LEN // sp)
                   if tp > 1 and variant == "lmm" else None)
    return dict(rank=context.rank, sp_rank=context.sp_rank, tp_rank=context.tp_rank,
                median_s=statistics.median(times), idle=statistics.median(idle),
                relay_bytes=relay_bytes[-1], analytic_relay_bytes=analytic,
                all_reduce_elements=collective[-1]["all_reduce"], analytic_all_reduce=expected_tp,
                all_gather_elements=collective[-1]["all_gather"], n_layers=config.n_layers)


def run_linear_scan(repeats: int, span: int, heads: int, dim: int):
    """Op level, depth-1 memory: forward + backward of the relay and of the scan over ranks."""
    from titans_train.parallel import ParallelContext
    from linear_scan_drivers import relay_memory_scan, scan_memory_scan

    context = ParallelContext.initialize(tp=1, sp=dist.get_world_size())
    generator = torch.Generator().manual_seed(context.rank)
    shape = (BATCH, heads, span, dim)
    q, k, v = (torch.randn(*shape, generator=generator).requires_grad_() for _ in range(3))
    gates = [torch.rand(BATCH, heads, span, generator=generator).requires_grad_() for _ in range(3)]
    weights = (torch.zeros(BATCH, heads, dim, dim, requires_grad=True),)
    momentum = (torch.zeros(BATCH, heads, dim, dim, requires_grad=True),)
    results = {}
    for method in ("relay", "scan"):
        times = []
        for repeat in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            if method == "relay":
                y, _, zero, relay = relay_memory_scan(q, k, v, *gates, weights, momentum,
                                                      chunk_size=16, context=context)
                (y.sum() + zero).backward()
                relay.finish()
            else:
                y, _ = scan_memory_scan(q, k, v, *gates, weights, momentum, chunk_size=16,
                                        context=context)
                y.sum().backward()
            dist.barrier()
            if repeat:
                times.append(time.perf_counter() - start)
        results[method] = statistics.median(times)
    return results


def run_sp_schedules(repeats: int):
    """Model step (forward + backward) of lmm with memory_depth 1 under sp_schedule relay and
    scan, alternating per repeat in the same processes; median seconds (slowest rank) and the
    time blocked in receives."""
    from dataclasses import replace

    from titans_train.model import TitansLM
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.parallelize import parallel_loss, parallelize

    context = ParallelContext.initialize(tp=1, sp=dist.get_world_size())
    torch.manual_seed(0)
    config = replace(model_config("lmm"), memory_depth=1)
    model = TitansLM(config)
    plan = parallelize(model, None, context)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(1))
    plans = {schedule: dataclasses.replace(plan, sp_schedule=schedule) for schedule in ("relay", "scan")}
    times = {"relay": [], "scan": []}
    waits = {"relay": [], "scan": []}
    for repeat in range(repeats + 1):
        for schedule in times:
            dist.barrier()
            start = time.perf_counter()
            step = parallel_loss(model, tokens, plans[schedule])
            step.objective.backward()
            step.relay.finish()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends with its slowest rank
            model.zero_grad(set_to_none=True)
            if repeat:  # repeat 0 warms up
                times[schedule].append(elapsed.item())
                waits[schedule].append(step.relay.wait_seconds)
    return {schedule: (statistics.median(times[schedule]), statistics.median(waits[schedule]))
            for schedule in times}


def print_sp_schedules(repeats: int) -> None:
    config = model_config("lmm")
    print(f"# sp_schedule relay vs scan: lmm, memory_depth 1, dim={config.dim} layers={config.n_layers} "
          f"heads={config.n_heads} chunk={config.chunk_size} batch={BATCH} seq_len={SEQ_LEN}, fp32, "
          f"gloo, 1 thread per process, forward + backward, median of {repeats}")
    print("| sp | relay s | scan s | scan / relay | blocked in receives, relay | scan | "
          "(P-1)/(L+P-1) |")
    print("|---|---|---|---|---|---|---|")
    for world in (2, 4):
        results = run_distributed(run_sp_schedules, world_size=world, timeout_s=600, repeats=repeats)
        relay, scan = results[0]["relay"][0], results[0]["scan"][0]  # the same on every rank
        # mean over ranks of the fraction of the step spent blocked in receives
        relay_wait, scan_wait = (statistics.mean(r[schedule][1] / r[schedule][0] for r in results)
                                 for schedule in ("relay", "scan"))
        print(f"| {world} | {relay:.3f} | {scan:.3f} | {scan / relay:.2f} | {relay_wait:.2f} | "
              f"{scan_wait:.2f} | {(world - 1) / (config.n_layers + world - 1):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lmm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sp-schedules", action="store_true",
                        help="only compare parallel.sp_schedule relay and scan (lmm, depth 1)")
    args = parser.parse_args()
    if args.sp_schedules:
        print_sp_schedules(args.repeats)
        return 0
    config = model_config(args.variant)
    print(f"# variant={args.variant} dim={config.dim} layers={config.n_layers} heads={config.n_heads} "
          f"memory_depth={config.memory_depth} batch={BATCH} seq_len={SEQ_LEN} fp32, gloo, "
          f"{torch.get_num_threads()} cores visible, 1 thread per process")
    baseline = None
    print("| tp | sp | world | step s (median) | vs tp=sp=1 | relay bytes/rank measured | analytic "
          "| tp all-reduce elems measured | analytic | idle measured | (P-1)/(L+P-1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tp, sp in LAYOUTS:
        records = run_distributed(run_layout, world_size=tp * sp, timeout_s=600,
                                  variant=args.variant, tp=tp, sp=sp, repeats=args.repeats)
        step_s = max(r["median_s"] for r in records)
        baseline = baseline or step_s
        relay = "/".join(str(r["relay_bytes"]) for r in records if r["tp_rank"] == 0)
        relay_expected = "/".join(str(r["analytic_relay_bytes"]) for r in records if r["tp_rank"] == 0)
        reduce = records[0]["all_reduce_elements"]
        reduce_expected = records[0]["analytic_all_reduce"]
        idle = statistics.mean(r["idle"] for r in records)
        model_idle = (sp - 1) / (config.n_layers + sp - 1)
        print(f"| {tp} | {sp} | {tp * sp} | {step_s:.3f} | {step_s / baseline:.2f} | {relay} | "
              f"{relay_expected} | {reduce} | {reduce_expected if reduce_expected is not None else '-'} | "
              f"{idle:.2f} | {model_idle:.2f} |")
    print()
    print("Linear memory (depth 1), one memory_scan of 4 heads x d=16 spread over P ranks, "
          "forward + backward, median s:")
    print("| P | span | relay s | scan over ranks s | scan / relay |")
    print("|---|---|---|---|---|")
    for world in (2, 4):
        span = 2048 // world
        result = run_distributed(run_linear_scan, world_size=world, timeout_s=600,
                                 repeats=args.repeats, span=span, heads=4, dim=16)[0]
        print(f"| {world} | {span} | {result['relay']:.3f} | {result['scan']:.3f} | "
              f"{result['scan'] / result['relay']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
