"""Training-step throughput (forward + backward + AdamW) of every variant next to the transformer.

    .venv/bin/python benchmarks/model_step.py                # ~10M parameters, T=1024, batch 1
    .venv/bin/python benchmarks/model_step.py --variants transformer mac --steps 3
    .venv/bin/python benchmarks/model_step.py --memory-implementations fused auto   # before/after a kernel
    .venv/bin/python benchmarks/model_step.py --conv-implementations reference auto

Prints, per variant: parameters, median tokens/s over the measured steps (after warm-up), the
ratio to the transformer baseline measured in the same process, the achieved GFLOP/s from the
analytic `flops_per_token` and its ratio to the transformer's. The models step in turn (one step
of each per round) and the ratios are medians of per-round ratios, so a machine whose speed drifts
affects the baseline and the variant alike. `--memory-implementations` times
every memory variant once per memory_scan implementation (`auto` is what a run uses: the C++
kernel on CPU), in the same process as the baseline; `--conv-implementations` likewise for the
memory's conv features (`kernels.conv_features`). Random tokens: throughput does not depend on
the data.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from titans_train.model import VARIANTS, TitansConfig, TitansLM, no_weight_decay
from titans_train.model import layers as layers_module
from titans_train.model import memory as memory_module
from titans_train.model.flops import flops_per_token

MEMORY_FREE = ("transformer", "swa")


def build_config(variant: str, args: argparse.Namespace) -> TitansConfig:
    return TitansConfig(
        variant=variant, vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers,
        n_heads=args.n_heads, chunk_size=args.chunk_size, segment_len=args.segment_len,
        window=args.window,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch flags (~10M parameters, T=1024, batch 1 by default)."""
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)


def make_optimizer(model: TitansLM) -> torch.optim.Optimizer:
    parameters = list(model.named_parameters())
    return torch.optim.AdamW([
        {"params": [p for n, p in parameters if not no_weight_decay(n, p)], "weight_decay": 0.1},
        {"params": [p for n, p in parameters if no_weight_decay(n, p)], "weight_decay": 0.0},
    ], lr=1e-3)


class Stepper:
    """One model with its optimizer and batch stream: `step()` times one training step."""

    def __init__(self, model: TitansLM, args: argparse.Namespace):
        self.model, self.args = model, args
        self.optimizer = make_optimizer(model)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> float:
        args = self.args
        tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), generator=self.generator)
        start = time.perf_counter()
        logits = self.model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark step")
        return elapsed


@contextlib.contextmanager
def implementations(memory_scan: str, conv_features: str):
    """The model's memory layers call memory_scan and conv_features with these implementations."""
    scan, features = memory_module.memory_scan, layers_module.conv_features
    memory_module.memory_scan = functools.partial(scan, implementation=memory_scan)
    layers_module.conv_features = functools.partial(features, implementation=conv_features)
    try:
        yield
    finally:
        memory_module.memory_scan, layers_module.conv_features = scan, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-implementations", nargs="+", default=["auto"],
                        choices=("auto", "cpp", "fused", "autograd"),
                        help="memory_scan implementations to time each memory variant with (default: auto)")
    parser.add_argument("--conv-implementations", nargs="+", default=["auto"], choices=("auto", "cpp", "reference"),
                        help="conv_features implementations to time each memory variant with (default: auto)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["transformer"] + [v for v in args.variants if v != "transformer"]
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x T {args.seq_len}, "
          f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, chunk {args.chunk_size}, "
          f"segment {args.segment_len}, window {args.window}, {args.warmup} warm-up + {args.steps} steps")
    print(f"{'variant':<26} {'params':>9} {'tokens/s':>9} {'vs transformer':>15} {'GFLOP/s':>8} "
          f"{'GFLOP/s vs tr.':>15}  step times (s)")
    runs = []  # (name, config, n_params, Stepper, (memory_scan, conv_features) implementations or None)
    combinations = [(scan, conv) for scan in args.memory_implementations for conv in args.conv_implementations]
    for variant in variants:
        for implementation in [None] if variant in MEMORY_FREE else combinations:
            torch.manual_seed(0)
            config = build_config(variant, args)
            model = TitansLM(config)
            if implementation is None:
                name = variant
            elif len(args.conv_implementations) == 1:
                name = f"{variant}[{implementation[0]}]"
            else:
                name = f"{variant}[{implementation[0]},conv {implementation[1]}]"
            runs.append((name, config, sum(p.numel() for p in model.parameters()), Stepper(model, args),
                         implementation))
    # Round-robin: every round takes one step of each model, so that a change in the machine's speed
    # (seen here: the same matmul at 1x-4x within minutes) falls on all of them alike.
    times = {name: [] for name, *_ in runs}
    for _ in range(args.warmup + args.steps):
        for name, _, _, stepper, implementation in runs:
            with implementations(*implementation) if implementation else contextlib.nullcontext():
                times[name].append(stepper.step())
    baseline_times = times[runs[0][0]][args.warmup:]
    baseline_flops = flops_per_token(runs[0][1], args.seq_len)
    for name, config, n_params, _, _ in runs:
        measured = times[name][args.warmup:]
        tokens_per_s = args.batch * args.seq_len / statistics.median(measured)
        gflops = tokens_per_s * flops_per_token(config, args.seq_len) / 1e9
        # Ratios per round (the baseline's step of the same round), then their median.
        speed = statistics.median(b / t for b, t in zip(baseline_times, measured))
        flops_ratio = speed * flops_per_token(config, args.seq_len) / baseline_flops
        print(f"{name:<26} {n_params / 1e6:>8.2f}M {tokens_per_s:>9.0f} {speed:>15.2f} "
              f"{gflops:>8.1f} {flops_ratio:>15.2f}  {' '.join(f'{t:.2f}' for t in measured)}", flush=True)


if __name__ == "__main__":
    main()
