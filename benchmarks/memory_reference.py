"""Our neural memory layer against the public reference implementation, forward+backward.

    pip install titans-pytorch==0.5.5      # benchmark only: not a dependency of titans-train
    .venv/bin/python benchmarks/memory_reference.py [--batch 2 --seq-len 2048 --dim 256 --heads 4 ...]

The public reference is lucidrains' `titans-pytorch` (`titans_pytorch.NeuralMemory`), the code the
Titans paper's community builds on. Both sides are whole memory layers: q/k/v projections,
short convs (ours), gates, the chunked inner gradient descent with momentum and forgetting, and
retrieval; the same widths (an MLP memory of the given depth and expansion per head), the same chunk
size, and *equal rebasing*: the reference's `batch_size` (how often its memory weights are
re-based, i.e. the inner gradients are taken at updated weights) is set to the chunk size, which
is what our memory_scan does at every chunk. Without `batch_size` the reference takes every
gradient of the sequence at the initial weights (much cheaper, different model); `--no-rebase`
times that too, for reference.

What still differs, so read the ratio as "the same job", not "the same arithmetic": the reference
adds RMSNorms before the memory and a LayerNorm inside its MLP, has no short convs, and retrieves
from chunk-start weights (our `retrieve=chunk`; `--retrieve token` times our per-token retrieval,
which does more work). Timed runs alternate the two implementations in one process, so the
ratio is taken under the same machine conditions; medians of --repeats pairs after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from titans_train.model.config import TitansConfig
from titans_train.model.memory import NeuralMemory


def reference_layer(args, rebase: bool):
    try:
        from titans_pytorch import MemoryMLP
        from titans_pytorch import NeuralMemory as ReferenceMemory
    except ImportError as error:
        raise SystemExit(f"the public reference is not installed ({error}): pip install titans-pytorch==0.5.5 "
                         "into this environment (benchmark only)") from None
    head_dim = args.dim // args.heads
    return ReferenceMemory(dim=args.dim, heads=args.heads, dim_head=head_dim, chunk_size=args.chunk_size,
                           batch_size=args.chunk_size if rebase else None,
                           model=MemoryMLP(head_dim, depth=args.depth, expansion_factor=args.expansion),
                           momentum=True)


def our_layer(args) -> NeuralMemory:
    config = TitansConfig(variant="lmm", vocab_size=256, dim=args.dim, n_layers=1, n_heads=args.heads,
                          n_memory_heads=args.heads, memory_depth=args.depth, memory_expansion=args.expansion,
                          chunk_size=args.chunk_size, retrieve=args.retrieve)
    return NeuralMemory(config)


def step_seconds(run, x: torch.Tensor) -> float:
    """One forward+backward of a layer on x (B, T, D); the loss is the output's sum."""
    start = time.perf_counter()
    run(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256, help="model width; head_dim = dim / heads")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--retrieve", choices=("chunk", "token"), default="chunk")
    parser.add_argument("--no-rebase", action="store_true", help="also time the reference without rebasing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = our_layer(args)
    state = ours.initial_state(args.batch, torch.device("cpu"), torch.float32)
    block_len = args.chunk_size
    reference = reference_layer(args, rebase=True)
    layers = {"ours": lambda x: ours(x, state, block_len)[0],
              "reference (equal rebasing)": lambda x: reference(x)[0]}
    if args.no_rebase:
        unrebased = reference_layer(args, rebase=False)
        layers["reference (no rebasing)"] = lambda x: unrebased(x)[0]
    x = torch.randn(args.batch, args.seq_len, args.dim)

    times: dict[str, list[float]] = {name: [] for name in layers}
    for repeat in range(args.warmup + args.repeats):
        for name, run in layers.items():
            seconds = step_seconds(run, x)
            if repeat >= args.warmup:
                times[name].append(seconds)
    tokens = args.batch * args.seq_len
    base = statistics.median(times["reference (equal rebasing)"])
    print(f"B={args.batch} T={args.seq_len} dim={args.dim} heads={args.heads} depth={args.depth} "
          f"expansion={args.expansion} chunk={args.chunk_size} ours: retrieve={args.retrieve} "
          f"threads={args.threads}, medians of {args.repeats} (after {args.warmup} warm-up)")
    print(f"{'layer':<28} {'step (ms)':>10} {'tokens/s':>10} {'speed-up vs reference':>22}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<28} {median * 1e3:>10.1f} {tokens / median:>10.0f} {base / median:>21.2f}x")


if __name__ == "__main__":
    main()
