"""`titans-train data ...`: prepare, train-tokenizer, builtin, inspect, verify."""

from __future__ import annotations

import argparse
import json
import os
import sys

from titans_train.data.errors import DataError
from titans_train.errors import EXIT_INTERRUPTED


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """What to prepare and how (shared with `titans-train slurm prepare`)."""
    parser.add_argument("inputs", nargs="+", help="files, directories or globs (.txt/.jsonl/.parquet, .gz/.zst)")
    parser.add_argument("-o", "--output", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizers JSON file (default: byte)")
    parser.add_argument("--eos-token", default=None, help="EOS token of a JSON tokenizer (default: guessed)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sample, plus one for the target shift")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column (default: text)")
    parser.add_argument("--format", dest="input_format", choices=("txt", "jsonl", "parquet"), default=None,
                        help="read every input as this format whatever its suffix (e.g. txt for text files "
                             "without one); default: by suffix")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    parser.add_argument("--shard-mb", type=float, default=256, help="target shard size in MiB (default: 256)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into webdataset shards + manifest")
    add_prepare_arguments(prepare)
    prepare.add_argument("--stage", choices=("tokenize", "shards", "merge"), default=None,
                         help="one stage of a prepare split over --num-tasks tasks (titans-train slurm prepare); "
                              "default: the whole prepare in this process")
    prepare.add_argument("--task", type=int, default=None, help="this task's index (default: $SLURM_ARRAY_TASK_ID, else 0)")
    prepare.add_argument("--num-tasks", type=int, default=1, help="tasks the stages are split over (default: 1)")

    train = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer (offline)")
    train.add_argument("inputs", nargs="+", help="files, directories or globs")
    train.add_argument("-o", "--output", required=True, help="tokenizer JSON file to write")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--text-field", default="text")
    train.add_argument("--min-frequency", type=int, default=2)

    builtin = commands.add_parser("builtin", help="prepare the built-in stdlib corpus into the cache")
    builtin.add_argument("--cache-dir", default=None, help="default: $TITANS_TRAIN_CACHE or ~/.cache/titans-train")
    builtin.add_argument("--tokenizer", default="byte")
    builtin.add_argument("--seq-len", type=int, required=True)

    inspect = commands.add_parser("inspect", help="summarise a prepared dataset and show a sample")
    inspect.add_argument("directory")
    inspect.add_argument("--sample", type=int, default=0, help="sample index to decode (default: 0)")
    inspect.add_argument("--chars", type=int, default=400, help="characters of the sample to print")

    verify = commands.add_parser("verify", help="check every shard's size and sha256 (and its digest file) "
                                               "against the manifest")
    verify.add_argument("directory")


def _prepare(args: argparse.Namespace) -> int:
    from titans_train.data.prepare import prepare_dataset, prepare_stage

    options = dict(text_field=args.text_field, input_format=args.input_format, eos_token=args.eos_token, seed=args.seed,
                   shard_bytes=int(args.shard_mb * 2**20), num_workers=args.workers, overwrite=args.overwrite,
                   progress=not args.quiet)
    if args.stage is not None:
        task = args.task if args.task is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        manifest = prepare_stage(args.stage, task, args.num_tasks, args.inputs, args.output, args.tokenizer,
                                 args.seq_len, **options)
        if manifest is None:
            print(f"prepare stage {args.stage}: task {task} of {args.num_tasks} done -> {args.output}")
            return 0
    else:
        manifest = prepare_dataset(args.inputs, args.output, args.tokenizer, args.seq_len, **options)
    print(f"prepared {manifest.num_samples} samples of {args.seq_len}+1 tokens in "
          f"{len(manifest.shards)} shards from {manifest.num_documents} documents "
          f"({manifest.text_bytes / 1e6:.1f} MB of text) -> {args.output}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        try:
            return _prepare(args)
        except KeyboardInterrupt:
            print("interrupted: the token files and shards finished so far are kept; run the same command again "
                  "to go on from them", file=sys.stderr)
            return EXIT_INTERRUPTED
    elif args.data_command == "train-tokenizer":
        from titans_train.data.train_tokenizer import train_tokenizer

        path = train_tokenizer(args.inputs, args.output, args.vocab_size, text_field=args.text_field,
                               min_frequency=args.min_frequency)
        print(f"wrote {path}")
    elif args.data_command == "builtin":
        from titans_train.data.builtin import builtin_corpus

        train_dir, validation_dir = builtin_corpus(args.cache_dir, args.tokenizer, args.seq_len)
        print(f"train: {train_dir}\nvalidation: {validation_dir}")
    elif args.data_command == "inspect":
        _inspect(args)
    elif args.data_command == "verify":
        from titans_train.data.dataset import PreparedDataset

        dataset = PreparedDataset(args.directory, verify="none")  # verify_all reads every byte instead
        dataset.verify_all()
        print(f"ok: {dataset.num_shards} shards, {len(dataset)} samples match {args.directory}/manifest.json")
    return 0


def _inspect(args: argparse.Namespace) -> None:
    from titans_train.data.dataset import PreparedDataset
    from titans_train.data.tokenizer import load_tokenizer

    dataset = PreparedDataset(args.directory, verify="none")  # a look, not a check: `data verify` checks
    manifest = dataset.manifest
    summary = {
        "samples": len(dataset), "seq_len": manifest.seq_len, "dtype": manifest.dtype,
        "shards": len(manifest.shards), "documents": manifest.num_documents,
        "tokens": manifest.num_tokens, "text_bytes": manifest.text_bytes,
        "tokenizer": {k: manifest.tokenizer[k] for k in ("name", "sha256", "vocab_size", "eos_id")},
        "sources": len(manifest.sources), "fingerprint": manifest.fingerprint,
    }
    print(json.dumps(summary, indent=1))
    key, tokens = dataset.read([args.sample])
    spec = manifest.tokenizer.get("spec", manifest.tokenizer["name"])
    try:
        text = load_tokenizer(spec).decode(tokens[0].tolist())
    except DataError as error:
        text = f"(cannot decode: {error})"
    print(f"sample {args.sample} (stream position {int(key[0])}):\n{text[: args.chars]}")


def run(args: argparse.Namespace) -> int:
    return _run(args)  # a DataError is a UserError: the CLI prints it on one line, exit 2
