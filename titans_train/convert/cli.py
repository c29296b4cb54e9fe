"""`titans-train convert SOURCE OUT --to hf|checkpoint`: see docs/convert.md.

SOURCE is a training checkpoint (a checkpoint dir, its checkpoints dir or the run dir: `latest`
is used), or for `--to checkpoint` also a directory written by `--to hf`. The source is only
read; OUT is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a training checkpoint (tag dir, checkpoints dir or run dir), or a --to hf output")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--to", required=True, choices=("hf", "checkpoint"),
                        help="hf: a transformers model directory; checkpoint: a one-file training checkpoint")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weight dtype written (hf)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship ('byte' or a tokenizers JSON); default: the run's data.tokenizer")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors files are split past this size (hf)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def convert(args: argparse.Namespace) -> Path:
    from titans_train.convert.consolidate import consolidate

    source, out = Path(args.source), Path(args.out)
    if args.to == "hf":
        from titans_train.convert.hf_export import export_hf

        return export_hf(consolidate(source), out, tokenizer=args.tokenizer, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    from titans_train.convert.hf_export import is_hf_directory, read_hf
    from titans_train.convert.to_checkpoint import write_checkpoint

    if is_hf_directory(source):
        weights, run = read_hf(source)
        facts = json.loads((source / "config.json").read_text()).get("titans_source", {})
        step, tokens = int(facts.get("step", 0)), int(facts.get("tokens_seen", 0))
    else:
        consolidated = consolidate(source)
        weights, run = consolidated.state, consolidated.run_config
        step, tokens = consolidated.manifest["step"], consolidated.manifest.get("tokens_seen", 0)
    return write_checkpoint(weights, run, out, step=step, tokens_seen=tokens, source=str(source),
                            overwrite=args.overwrite, sources=(source,))


def run(args: argparse.Namespace) -> int:
    """Bad input raises a ConversionError, which the CLI prints on one line (exit 2)."""
    written = convert(args)
    print(f"[convert] wrote {written}", file=sys.stderr)
    return 0
