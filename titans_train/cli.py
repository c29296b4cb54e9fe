"""The one command line: `titans-train SUBCOMMAND ...` (also `python -m titans_train`).

Each subcommand lives in its own module, imported only when used so `titans-train --help` stays
fast. A subcommand module defines `add_arguments(parser)` and `run(args) -> int`.

A `titans_train.errors.UserError` raised anywhere below is caught here: one line on stderr
(from rank 0 only, under a launcher), exit code 2; so is a full disk or quota (ENOSPC, EDQUOT).
`TITANS_TRAIN_DEBUG=1` re-raises them with their traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings

from titans_train.errors import EXIT_USER_ERROR, ConfigError, UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("titans_train.train.cli", "pretrain a model from a recipe"),
    "config": ("titans_train.config.cli", "show or check a resolved recipe"),
    "model": ("titans_train.model.cli", "model facts (parameter count, FLOPs) for a recipe"),
    "plan": ("titans_train.plan.cli", "will a layout fit a GPU cluster: memory, communication, time"),
    "data": ("titans_train.data.cli", "prepare datasets, train tokenizers, inspect shards"),
    "slurm": ("titans_train.slurm.cli", "submit, watch and cancel SLURM jobs (training, sweeps, data preparation)"),
    "generate": ("titans_train.generate", "continue a prompt from a checkpoint, memory updating as it reads"),
    "eval": ("titans_train.eval.cli", "evaluate a model: held-out perplexity by position, long-context retrieval"),
    "convert": ("titans_train.convert.cli", "a checkpoint of any layout to a Hugging Face model, or back"),
    "study": ("titans_train.study.cli", "scaling studies: plan, run, collect, fit and plot a grid of runs"),
    "reproduce": ("titans_train.eval.reproduction", "the paper's retrieval orderings in small: train a study's "
                  "variants on the study corpus, evaluate them, tabulate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans-train", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed and megatron-core call collectives torch 2.13 deprecates, once per call site and
    # rank and again after their own warning filters reset: noise a user cannot act on.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    # megatron-core warns at import, per module and rank, that its fused optimizer and FSDP kernels
    # fall back to local ones: we use neither (DeepSpeed optimizes, megatron gives only the
    # tensor-parallel layers), so the warning says nothing about this framework's run.
    warnings.filterwarnings("ignore", category=UserWarning, message=r"Transformer Engine and Apex are not installed")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the subcommand name first, then let its module define the rest of its arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub_parser = argparse.ArgumentParser(
        prog=f"titans-train {known.command}", description=SUBCOMMANDS[known.command][1]
    )
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        if os.environ.get("TITANS_TRAIN_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            kind = "config error" if isinstance(error, ConfigError) else "error"
            print(f"{kind}: {error}".replace("\n", " "), file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        # A full disk or quota is the user's to fix, wherever the write happened; any other OS
        # error may be a bug and keeps its traceback.
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("TITANS_TRAIN_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            where = f" writing {error.filename}" if error.filename else ""
            print(f"error: {os.strerror(error.errno).lower()}{where}: free space on that file system (or "
                  f"point the output elsewhere) and run the command again", file=sys.stderr)
        return EXIT_USER_ERROR
