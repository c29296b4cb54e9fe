"""How much of each mixer's forward + backward is per-op overhead rather than arithmetic.

    .venv/bin/python benchmarks/mixer_overhead.py --threads 2
    .venv/bin/python benchmarks/mixer_overhead.py --threads 2 --variants mac lmm --reps 30

One layer's mixer (the model flags and defaults of `model_step.py`: dim 256, 4 heads, T=1024,
batch 1) runs forward and backward on random input, timed (median over `--reps`, the mixers
taking turns each round, as model_step.py's models do). The same mixer at `--narrow-dim` (default
16: the same heads, tokens, chunks, segments and window, every projection 256x and every memory
matmul 256x smaller) does nearly the same number of ops on nearly no data, so its time is an upper
bound of the per-op overhead (Python, dispatch, autograd, the kernels' own per-chunk setup) in the
full-width time; it also still holds the attention's T x T score work, at head dim 4. `ops` counts
the ATen ops dispatched in forward and backward at full width (those the C++ kernels issue
included; not counted with `--compile`). The memory rows time a memory variant's neural memory alone on the T tokens in one
call and in T / segment_len calls (what MAC does): the difference per extra call is the fixed
cost of a memory call. The last line is the cost of one differentiable op (forward and backward)
on an 8-element tensor and on a (1, 128, 256) one: a chain of muls, less the chain's ends.
`--compile` runs every mixer (not the memory rows) under torch.compile, compiled in the warm-up.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import add_model_arguments, build_config  # noqa: E402

from titans_train.model import VARIANTS, TitansLM  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def one_layer_mixer(variant: str, args: argparse.Namespace, dim: int):
    """(config, mixer, random input (B, T, dim)) of a one-layer model at width `dim`, seeded."""
    torch.manual_seed(0)
    config = build_config(variant, argparse.Namespace(**{**vars(args), "dim": dim, "n_layers": 1}))
    mixer = TitansLM(config).layers[0].mixer
    return config, mixer, torch.randn(args.batch, args.seq_len, dim, requires_grad=True)


def mixer_step(variant: str, args: argparse.Namespace, dim: int):
    """A closure running the forward of a one-layer model's mixer at width `dim`."""
    _, mixer, x = one_layer_mixer(variant, args, dim)
    run = torch.compile(mixer) if args.compile else mixer

    def step():
        output, _ = run(x, mixer.initial_state(args.batch, x.device, x.dtype), 0)
        return output

    return step


def memory_step(args: argparse.Namespace, dim: int, calls: int):
    """A closure running an lmm layer's neural memory over T tokens in `calls` calls."""
    config, mixer, x = one_layer_mixer("lmm", args, dim)

    def step():
        state = mixer.memory.initial_state(args.batch, x.device, x.dtype)
        outputs = []
        for piece in x.split(args.seq_len // calls, dim=1):
            retrieved, state = mixer.memory(piece, state, config.chunk_size)
            outputs.append(retrieved)
        return torch.cat(outputs, dim=2)

    return step


def op_cost(shape: tuple[int, ...], reps: int = 500, chain: int = 20) -> float:
    """Microseconds per mul with its backward, in a chain of `chain` on a tensor of `shape`."""
    x = torch.randn(shape, requires_grad=True)

    def run(length: int) -> float:
        for _ in range(20):
            _chain(x, length).sum().backward()
        start = time.perf_counter()
        for _ in range(reps):
            _chain(x, length).sum().backward()
        return (time.perf_counter() - start) / reps

    return (run(chain) - run(0)) / chain * 1e6


def _chain(x: torch.Tensor, length: int) -> torch.Tensor:
    for _ in range(length):
        x = x * 1.0001
    return x


def forward_backward(step) -> None:
    step().sum().backward()


def count_ops(step) -> tuple[int, int]:
    with OpCounter() as forward:
        output = step()
    loss = output.sum()
    with OpCounter() as backward:
        loss.backward()
    return forward.count, backward.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    add_model_arguments(parser)
    parser.add_argument("--narrow-dim", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile every mixer")
    args = parser.parse_args()
    if args.seq_len % args.segment_len:
        parser.error(f"--seq-len {args.seq_len} must be a multiple of --segment-len {args.segment_len}")
    torch.set_num_threads(args.threads)
    calls = args.seq_len // args.segment_len
    runs = {}  # name -> (full-width step, narrow step)
    for variant in args.variants:
        runs[variant] = (mixer_step(variant, args, args.dim), mixer_step(variant, args, args.narrow_dim))
    for n_calls in (1, calls):
        runs[f"memory, {n_calls} call{'s' if n_calls > 1 else ''}"] = (
            memory_step(args, args.dim, n_calls), memory_step(args, args.narrow_dim, n_calls))
    times = collections.defaultdict(list)
    for round_index in range(args.reps + 2):  # two warm-up rounds
        for name, steps in runs.items():
            for width, step in zip(("full", "narrow"), steps):
                start = time.perf_counter()
                forward_backward(step)
                if round_index >= 2:
                    times[name, width].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x T {args.seq_len}, "
          f"dim {args.dim} (narrow {args.narrow_dim}), {args.n_heads} heads, chunk {args.chunk_size}, "
          f"segment {args.segment_len}, window {args.window}, {args.reps} rounds"
          f"{', compiled' if args.compile else ''}")
    print(f"{'mixer':<18} {'ms':>7} {'narrow ms':>10} {'narrow/ms':>10} {'fwd ops':>8} {'bwd ops':>8}")
    for name, (full_step, _) in runs.items():
        full = statistics.median(times[name, "full"]) * 1e3
        narrow = statistics.median(times[name, "narrow"]) * 1e3
        # (Not counted under torch.compile: a dispatch mode would change what is compiled.)
        forward_ops, backward_ops = ("-", "-") if args.compile else count_ops(full_step)
        print(f"{name:<18} {full:>7.1f} {narrow:>10.1f} {narrow / full:>10.2f} {forward_ops:>8} {backward_ops:>8}",
              flush=True)
    print(f"one op, forward + backward: {op_cost((1, 4, 8)):.1f} us (8 elements), "
          f"{op_cost((1, 128, 256)):.1f} us ((1, 128, 256))")


if __name__ == "__main__":
    main()
