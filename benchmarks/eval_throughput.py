"""Evaluation throughput (tokens/s) and peak memory against sequence length, streaming.

    .venv/bin/python benchmarks/eval_throughput.py                       # T = 1x .. 16x of 512
    .venv/bin/python benchmarks/eval_throughput.py --variants mac transformer --multiples 1 4

What `titans-train eval ppl` does per window: read it in segments of `--segment` tokens with the
model state carried (`titans_train.eval.ppl.streamed_token_losses`, no gradients). Each
(variant, length) runs in its own fresh process, so the peak resident memory (CPU; on CUDA the
peak allocated memory) belongs to that measurement alone; the baseline is the same process's
memory after building the model. Expected shape: flat memory for lmm/mac/mag/mal/swa (their state
is bounded: memory weights, a window, one open segment), growing with T for the transformer (its
state is every key and value). Random tokens: throughput does not depend on the data.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from titans_train.model import VARIANTS, TitansConfig, TitansLM


def measure(variant: str, length: int, args: argparse.Namespace) -> dict:
    from titans_train.eval.distributed import EvalLayout
    from titans_train.eval.ppl import streamed_token_losses
    from titans_train.parallel import ParallelContext

    torch.manual_seed(0)
    config = TitansConfig(variant=variant, vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers,
                          n_heads=args.n_heads, chunk_size=args.chunk_size, segment_len=args.segment_len,
                          window=args.window)
    device = torch.device(args.device)
    model = TitansLM(config).to(device).eval()
    context = EvalLayout.from_context(ParallelContext.initialize()).context
    tokens = torch.randint(0, args.vocab_size, (args.batch, length + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)
    streamed_token_losses(model, tokens[:, : 2 * args.segment + 1], args.segment, context)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    streamed_token_losses(model, tokens, args.segment, context)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "length": length, "tokens_per_second": args.batch * length / elapsed,
            "peak_bytes": peak, "growth_bytes": max(peak - baseline, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["lmm", "mac", "mag", "swa", "transformer"], choices=VARIANTS)
    parser.add_argument("--multiples", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="T / segment")
    parser.add_argument("--segment", type=int, default=512, help="tokens per call (the training length)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=264)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--segment-len", type=int, default=128, help="mac attention segment")
    parser.add_argument("--window", type=int, default=256, help="swa / mag / mal attention window")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    forwarded = sys.argv[1:]
    print(f"{'variant':<12} {'T':>7} {'tokens/s':>10} {'peak MiB':>9} {'growth MiB':>11}")
    for variant in args.variants:
        for multiple in args.multiples:
            length = multiple * args.segment
            run = subprocess.run([sys.executable, __file__, *forwarded, "--one", variant, str(length)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{variant:<12} {length:>7} {row['tokens_per_second']:>10.0f} {row['peak_bytes'] / 2**20:>9.1f} "
                  f"{row['growth_bytes'] / 2**20:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
