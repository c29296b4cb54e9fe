"""`titans-train train RECIPE [key=value ...]`: pretrain from a recipe, one process or N (torchrun).

Exit codes: 0 done, 2 configuration error (nothing started), 3 the loss diverged (NaN/inf; stopped
without saving), 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue the job; it
resumes from that checkpoint).
"""

from __future__ import annotations

import argparse
import math
import os

from titans_train.errors import EXIT_OK
from titans_train.train import stop_signals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name (`titans-train config list`) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 parallel.zero_stage=2")


def run(args: argparse.Namespace) -> int:
    stop_signals.catch()  # before the heavy imports: a SIGTERM from the first moment is a requested stop
    try:
        return _train(args)
    finally:
        stop_signals.release()  # a config error, too, gives the signals back (in-process callers)


def _train(args: argparse.Namespace) -> int:
    from titans_train.config import load_recipe
    from titans_train.train.distributed import shutdown_distributed, world_size_from_environment

    config = load_recipe(args.recipe, args.overrides, world_size=world_size_from_environment())
    if config.parallel.tp > 1:
        # megatron-core's tensor-parallel linears issue their gradient all-reduce before the
        # weight-gradient matmul and rely on one hardware queue to keep that order (overlap, not
        # correctness). It must be set before CUDA starts; an explicit value of the user's wins.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from titans_train.train.trainer import train

    result = train(config)
    shutdown_distributed()
    if result.rank != 0 or result.exit_code != EXIT_OK:  # a stop has said why, in one line
        return result.exit_code
    if result.validation and result.resumed_from is None:
        first_step, last_step = min(result.validation), max(result.validation)
        if last_step > first_step:
            start, end = (math.exp(min(result.validation[s], 50.0)) for s in (first_step, last_step))
            print(f"validation perplexity: {start:.2f} at step {first_step} -> {end:.2f} at step {last_step}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    return result.exit_code
