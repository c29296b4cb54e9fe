"""`titans-train eval SOURCE --tasks ppl,niah,babilong,mqar`: see docs/evals.md.

One process, or N under torchrun: `--tp` ranks share one model's heads, every other rank is a
replica taking a strided part of each task's items, and the numbers are the same on any layout.
Rank 0 prints the table (or, with `--json`, the results as JSON on stdout), writes `--out` and,
beside it, a heatmap PNG per retrieval task, and logs to wandb when `--wandb` is not disabled.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from titans_train.eval.errors import EvalOptionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a run dir (uses `latest`), a checkpoint dir, or a `convert --to hf` directory")
    parser.add_argument("--tasks", default="ppl", help="comma-separated: ppl, niah, babilong, mqar")
    parser.add_argument("--lengths", default="1x,2x,4x",
                        help="context lengths: multiples of the training length (4x) or token counts (512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated probe")
    parser.add_argument("--samples", type=int, default=4, help="probes per grid cell (length x depth, ...)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah needle depths, fractions of the context")
    parser.add_argument("--needle", default="passkey", help="niah needle: passkey, number, uuid, word")
    parser.add_argument("--haystack", default="natural",
                        help="niah/babilong haystack: natural (held-out text) or repeat (RULER's noise)")
    parser.add_argument("--data", default=None,
                        help="a prepared held-out split (default: the run's validation split); also the natural haystack")
    parser.add_argument("--segment", type=int, default=0, help="tokens per model call when streaming (0: training length)")
    parser.add_argument("--batch-size", type=int, default=8, help="ppl windows per model call")
    parser.add_argument("--bucket", type=int, default=0, help="ppl position-bucket width (0: training length / 2)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the evaluation (divides the world)")
    parser.add_argument("--out", default=None, help="results JSON file; heatmaps are written beside it")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of a table")
    parser.add_argument("--write-data", default="", help="write the generated probes here (one JSONL per task)")
    parser.add_argument("--wandb", default="disabled", choices=("disabled", "offline", "online"),
                        help="log the numbers to wandb through the run logger")
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (this rank's device: its CUDA device when CUDA is "
                             "present, else cpu), cpu, cuda or cuda:N")


def requested_device(text: str):
    """`--device` checked before any model is loaded: a torch.device, or None for `auto`, which
    `evaluate` resolves to this rank's device once the process group exists (under torchrun,
    init_distributed selects the rank's local CUDA device)."""
    import torch

    if text == "auto":
        return None
    try:
        device = torch.device(text)
    except RuntimeError:
        raise EvalOptionError("--device", f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise EvalOptionError("--device", f"{text!r}: evaluation runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalOptionError("--device", f"{text!r} but this machine has no CUDA device; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EvalOptionError("--device", f"{text!r} but this machine has {torch.cuda.device_count()} CUDA "
                                          f"device(s); use auto or cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def held_out_directory(config, data: str | None) -> str:
    """The prepared split ppl reads: --data, else the run's validation split."""
    if data:
        return data
    if config.data.source == "builtin":
        from titans_train.data import builtin_corpus

        return builtin_corpus(config.data.cache_dir or None, tokenizer=config.data.tokenizer,
                              seq_len=config.train.seq_len)[1]
    if not config.data.validation_dir:
        raise EvalOptionError("--data", "the run has no data.validation_dir; pass a prepared held-out split")
    return config.data.validation_dir


def _layout(tp: int):
    from titans_train.eval.distributed import EvalLayout
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.layout import ParallelConfigError

    if tp > 1:  # megatron's tensor-parallel linears warn without it (see titans_train/train/cli.py)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from titans_train.train.distributed import init_distributed

        init_distributed()
    try:
        return EvalLayout.from_context(ParallelContext.initialize(tp=tp, sp=1))
    except ParallelConfigError as error:
        raise EvalOptionError("--tp", str(error)) from None


def _shard(loaded, layout, tp: int) -> None:
    from titans_train.parallel.parallelize import parallelize

    model = loaded.model.config
    for name in ("n_heads", "memory_heads"):
        heads = getattr(model, name, None)
        if heads and heads % tp:
            raise EvalOptionError("--tp", f"{tp} does not divide the model's {name}={heads}; use a divisor of it")
    parallelize(loaded.model, None, layout.context)


def _log_wandb(results: dict, config, mode: str, out_dir: Path) -> None:
    from omegaconf import OmegaConf

    from titans_train.config import to_container
    from titans_train.eval.tasks import flat_metrics
    from titans_train.train.logging import RunLogger

    config = OmegaConf.merge(config, {"run_dir": str(out_dir), "logging": {
        "wandb_mode": mode, "wandb_name": f"{config.name}-eval"}})
    logger = RunLogger(config, enabled=True, resolved_config={"eval": results["options"], **to_container(config)})
    logger.metrics(results["step"], flat_metrics(results["tasks"]))
    logger.close()


def evaluate(args: argparse.Namespace):
    """(results, the source's run config) on every rank: collective under a launcher."""
    from titans_train.eval.ppl import held_out_stream
    from titans_train.eval.source import load_source
    from titans_train.eval.tasks import EvalOptions, check_options, parse_lengths, parse_tasks, run_tasks

    tasks = parse_tasks(args.tasks)
    try:
        depths = tuple(float(d) for d in args.depths.split(","))
    except ValueError:
        raise EvalOptionError("--depths", f"{args.depths!r}: give fractions such as 0,0.5,1") from None
    device = requested_device(args.device)
    loaded = load_source(args.source)
    seq_len = int(loaded.config.train.seq_len)
    options = EvalOptions(tasks=tasks, lengths=parse_lengths(args.lengths, seq_len), seed=args.seed,
                          samples=args.samples, depths=depths, needle=args.needle, haystack=args.haystack,
                          segment=args.segment, batch_size=args.batch_size, bucket=args.bucket,
                          write_data=args.write_data)
    check_options(options)
    layout = _layout(args.tp)
    _shard(loaded, layout, args.tp)
    if device is None:
        from titans_train.train.distributed import current_device

        device = current_device()
    loaded.model.to(device)
    held_out = haystack = None
    if "ppl" in tasks or args.data:
        held_out = held_out_stream(held_out_directory(loaded.config, args.data), loaded.tokenizer)
        haystack = held_out if args.data else None
    results = {"source": loaded.origin, "name": loaded.config.name, "step": loaded.step, "seed": args.seed,
               "layout": {"tp": layout.context.tp_size, "replicas": layout.replicas, "device": str(device)},
               "options": {"tasks": tasks, "lengths": options.lengths, "samples": options.samples,
                           "depths": list(depths), "needle": options.needle, "haystack": options.haystack,
                           "data": args.data},
               "tasks": run_tasks(loaded.model, loaded.tokenizer, layout, options, seq_len, held_out, haystack)}
    return results, loaded.config


def report(results: dict, config, args: argparse.Namespace) -> None:
    import json

    from titans_train.eval.report import HEATMAP_COLUMNS, heatmap, table, write_json

    print(json.dumps(results, indent=1) if args.json else table(results), flush=True)
    if args.out:
        out = Path(args.out)
        write_json(results, out)
        for task, column in HEATMAP_COLUMNS.items():
            if task in results["tasks"]:
                path = heatmap(results["tasks"][task], column, out.with_suffix(f".{task}.png"),
                               f"{task}: {results['name']} step {results['step']}")
                print(f"[eval] wrote {path}", file=sys.stderr)
        print(f"[eval] wrote {out}", file=sys.stderr)
    if args.wandb != "disabled":
        _log_wandb(results, config, args.wandb,
                   Path(args.out).parent if args.out else Path("runs") / f"{results['name']}-eval")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from titans_train.train.distributed import shutdown_distributed

    results, config = evaluate(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        report(results, config, args)
    shutdown_distributed()
    return 0
