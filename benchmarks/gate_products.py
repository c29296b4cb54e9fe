"""Forward+backward time of memory_scan's gate products: PyTorch (`fused.stacked_gates`, what `fused`
runs) against C++ (`cpu.cpp_stacked_gates`, what `cpp` and so `auto` on CPU run), one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_products.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_products.py --groups 4 --seq-lens 1024 128 --chunk-size 64

Defaults are model_step.py's shapes: G = batch x heads = 4, chunk 64; T = 1024 is one call of the
lmm/mag/mal memory per layer, T = 128 one of MAC's per-segment calls (segment_len 128, 8 per layer).
Prints the median seconds of each over --repeats turns timed alternately (`memory_scan.py`'s
`alternating_ab`) and the median per-turn ratio; measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_scan import alternating_ab  # noqa: E402

from titans_train.kernels.memory_scan.cpu import cpp_stacked_gates  # noqa: E402
from titans_train.kernels.memory_scan.fused import stacked_gates  # noqa: E402


def make_gates(groups, seq_len):
    """Gates near a model's initialisation (as benchmarks/memory_scan.py), (1, G, T), requiring grad."""
    theta = 0.03 * torch.rand(1, groups, seq_len)
    eta = 0.5 + 0.5 * torch.rand(1, groups, seq_len)
    alpha = 0.02 * torch.rand(1, groups, seq_len)
    return [x.requires_grad_() for x in (theta, eta, alpha)]


def forward_backward(gate_products, gates, upstream, chunk_size):
    torch.autograd.backward(gate_products(*gates, chunk_size), upstream)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4, help="G = batch x heads")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 128])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"gate products forward+backward, G={args.groups}, chunk {args.chunk_size}, threads={args.threads}, "
          f"median of {args.repeats} alternating turns")
    print(f"{'T':>6} {'pytorch (ms)':>13} {'cpp (ms)':>9} {'cpp / pytorch':>14}")
    for seq_len in args.seq_lens:
        gates = make_gates(args.groups, seq_len)
        upstream = [torch.randn_like(x) for x in stacked_gates(*gates, args.chunk_size)]
        steps = {
            name: functools.partial(forward_backward, function, gates, upstream, args.chunk_size)
            for name, function in (("cpp", cpp_stacked_gates), ("pytorch", stacked_gates))
        }
        medians, ratios = alternating_ab(steps, args.repeats, args.warmup)
        print(f"{seq_len:>6} {medians['pytorch'] * 1e3:>13.3f} {medians['cpp'] * 1e3:>9.3f} {ratios['pytorch']:>14.3f}")


if __name__ == "__main__":
    main()
