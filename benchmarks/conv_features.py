"""conv_features forward + backward, the C++ op against the PyTorch reference, at model_step's shapes.

    .venv/bin/python benchmarks/conv_features.py                 # T 128 (a MAC segment) and 1024, 256 channels
    .venv/bin/python benchmarks/conv_features.py --seq-lens 128 --threads 1

The implementations alternate call by call (a drift in the machine's speed falls on both alike);
prints the median microseconds per forward + backward of each and their ratio (median of the
per-round ratios), for q/k (normalised per head) and v (not normalised).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from titans_train.kernels import conv_features

IMPLEMENTATIONS = ("reference", "cpp")


def time_once(implementation: str, padded: torch.Tensor, weight: torch.Tensor, head_dim: int,
              grad: torch.Tensor) -> float:
    start = time.perf_counter()
    out = conv_features(padded, weight, head_dim, implementation)
    torch.autograd.grad(out, (padded, weight), grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.channels} channels, "
          f"kernel {args.kernel}, {args.rounds} rounds (the first tenth discarded)")
    print(f"{'T':>6} {'features':<10} {'reference us':>13} {'cpp us':>8} {'cpp / reference':>16}")
    for seq_len in args.seq_lens:
        for label, head_dim in (("q, k", args.head_dim), ("v", 0)):
            padded = torch.randn(args.batch, args.kernel - 1 + seq_len, args.channels, requires_grad=True)
            weight = torch.randn(args.channels, args.kernel, requires_grad=True)
            grad = torch.randn(args.batch, seq_len, args.channels)
            times = {name: [] for name in IMPLEMENTATIONS}
            for _ in range(args.rounds):
                for name in IMPLEMENTATIONS:
                    times[name].append(time_once(name, padded, weight, head_dim, grad))
            kept = {name: values[args.rounds // 10:] for name, values in times.items()}
            ratio = statistics.median(c / r for c, r in zip(kept["cpp"], kept["reference"]))
            print(f"{seq_len:>6} {label:<10} {statistics.median(kept['reference']) * 1e6:>13.0f} "
                  f"{statistics.median(kept['cpp']) * 1e6:>8.0f} {ratio:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
