"""Building a >= 1B model: peak memory per rank and build time, partitioned (ZeRO-3) against whole.

    .venv/bin/python benchmarks/construction.py [--recipe mac-1.3b] [--world 4] [--steps 0]
                                                [--no-whole] [--glibc-heap] [key=value ...]

- whole: one process builds the plain `TitansLM` of the recipe in fp32, what every rank did
  before partitioned construction (the parameters alone are 4 bytes x P);
- partitioned: `--world` gloo processes build it as the trainer does under the recipe's ZeRO-3
  and precision (`titans_train.parallel.construction`), each holding only its partition; with
  `--steps N` each then takes N optimizer steps on random tokens (AdamW through DeepSpeed).

Printed per rank: peak resident memory (VmHWM) before and after the build (and after the steps,
with the peak by phase: engine set-up, forward, backward, DeepSpeed's optimizer step), the
elements it holds, the build time (and each step's). Freed tensors of 1 MiB or more go back to
the OS (`tests/recipe_zero3.py`, `return_freed_tensors_to_the_os`) unless `--glibc-heap`, so the
peaks measure what the model and ZeRO hold rather than glibc's heap. Every rank stops itself
when the machine's available memory falls under 1 GiB. The recipe's seq_len, micro batch and batch are shrunk
by default (`train.seq_len=64 train.micro_batch_size=1 train.global_batch_tokens=256`, the
model is not); extra `key=value` overrides follow them.

Memory needed: the whole build ~4 B x P (5.3 GB for 1.32B); the partitioned build ~2 B x P / world
per rank in bf16 plus ~0.4 GB of libraries; steps add gradients, master weights and Adam's two
moments: 16 B x P over all ranks with fp32 optimizer state (21 GB for 1.32B, whatever the world
size), 10 B x P with `train.optimizer_precision=bf16` (13.2 GB; measured ~19 GiB over 4 ranks
with ZeRO's buffers and the libraries: docs/scaling.md). Times from a loaded machine are not
results: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from distributed import run_distributed  # noqa: E402
from recipe_zero3 import build_recipe_zero3, peak_rss_bytes  # noqa: E402

SHRUNK = ["train.seq_len=64", "train.micro_batch_size=1", "train.global_batch_tokens=256"]
GIB = 2**30


def whole_build(recipe: str, overrides: list[str]) -> dict:
    """The plain model in fp32 in this process, as every rank built it before."""
    from titans_train.config import load_recipe, model_config
    from titans_train.model import TitansLM

    config = load_recipe(recipe, overrides, world_size=None)
    before = peak_rss_bytes()
    began = time.perf_counter()
    model = TitansLM(model_config(config), init_seed=config.train.seed)
    seconds = time.perf_counter() - began
    return dict(parameters=sum(p.numel() for p in model.parameters()), before=before, peak=peak_rss_bytes(),
                seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mac-1.3b")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--no-whole", action="store_true", help="skip the whole fp32 build")
    parser.add_argument("--glibc-heap", action="store_true",
                        help="keep glibc's default heap (freed tensors under 32 MiB stay resident)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    overrides = [*SHRUNK, *args.overrides]
    print(f"{args.recipe} with {' '.join(overrides)}")
    if not args.no_whole:
        (whole,) = run_distributed(whole_build, 1, args.timeout, init_process_group=False,
                                   recipe=args.recipe, overrides=overrides)
        print(f"whole, 1 process, fp32: {whole['parameters'] / 1e6:.1f}M parameters | peak RSS "
              f"{whole['before'] / GIB:.2f} GiB before, {whole['peak'] / GIB:.2f} GiB after | {whole['seconds']:.1f} s")
    results = run_distributed(build_recipe_zero3, args.world, args.timeout, init_process_group=False,
                              recipe=args.recipe, overrides=overrides, steps=args.steps, guard_bytes=GIB,
                              mmap_threshold=0 if args.glibc_heap else 2**20)
    for rank, result in enumerate(results):
        line = (f"partitioned, rank {rank} of {args.world}, ZeRO-3 {result['dtype'].removeprefix('torch.')}: "
                f"{result['local_elements'] / 1e6:.1f}M of {result['parameters'] / 1e6:.1f}M elements | peak RSS "
                f"{result['before'] / GIB:.2f} GiB before, {result['peak'] / GIB:.2f} GiB after the build | "
                f"{result['seconds']:.1f} s")
        if args.steps:
            line += (f" | after {args.steps} steps {result['peak_after_steps'] / GIB:.2f} GiB, step "
                     f"{min(result['step_seconds']):.1f}-{max(result['step_seconds']):.1f} s, losses "
                     f"{', '.join(f'{loss:.3f}' for loss in result['losses'])} | peak by phase "
                     f"{', '.join(f'{phase} {peak / GIB:.2f}' for phase, peak in result['phase_peaks'].items())} GiB")
        print(line)
        if not result["first_elements_match"]:
            raise SystemExit(f"rank {rank}: its partition does not hold the rule's values")


if __name__ == "__main__":
    main()
