"""What shard content checks (data.verify) cost per training step, and what opening a big
manifest costs.

    .venv/bin/python benchmarks/data_verify.py
    .venv/bin/python benchmarks/data_verify.py --batch 512 --seq-len 4095 --steps 50 --repeats 5

Prints medians over --repeats runs of:
- one rank's global batch (--batch samples of --seq-len + 1 tokens) read through TokenLoader
  (0 workers) at data.verify = none / sampled / full: ms per step, and the checks' cost over
  "none" in ms and in % of the read;
- the same with shards forced out of the open-shard LRU on every read (max_open_shards=1 over a
  shuffled order: each read reopens a shard, the worst case of 10^5 shards), per level;
- `titans-train data verify` (every byte against its sha256): MB/s;
- opening a synthetic 10^5-shard manifest of 10^12 tokens (no shard written): read_manifest +
  fingerprint + index, seconds.
Numbers from a loaded machine are worthless: run it on a quiet one (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import timeit

from titans_train.data import dataset as dataset_module
from titans_train.data.dataset import PreparedDataset
from titans_train.data.loader import TokenLoader
from titans_train.data.manifest import read_manifest
from titans_train.data.prepare import prepare_dataset
from titans_train.data.shards import VERIFY_LEVELS, digests_name
from titans_train.data.synthetic import synthetic_documents, synthetic_manifest, write_corpus


def median_seconds(function, repeats: int) -> float:
    return statistics.median(timeit.repeat(function, number=1, repeat=repeats))


def step_ms(directory: str, args, verify: str, max_open_shards: int | None = None) -> float:
    loader = TokenLoader(directory, seq_len=args.seq_len, global_batch_size=args.batch, micro_batch_size=args.batch,
                         seed=0, verify=verify)
    if max_open_shards is not None:
        loader.stream.datasets[0].max_open_shards = max_open_shards
    list(itertools.islice(loader, 2))  # warm: page cache, first opens

    def steps():
        for batch in itertools.islice(loader, args.steps):
            assert batch.shape == (args.batch, args.seq_len + 1)

    return median_seconds(steps, args.repeats) / args.steps * 1e3


def manifest_open_seconds(scratch: str, repeats: int) -> float:
    directory = os.path.join(scratch, "synthetic")
    manifest = synthetic_manifest(directory, 10**12, 10**5, seq_len=2047)
    names = ["manifest.json"] + [s["file"] for s in manifest.shards] + [digests_name(s["file"]) for s in manifest.shards]
    listdir = dataset_module.os.listdir
    dataset_module.os.listdir = lambda path: names if path == os.path.abspath(directory) else listdir(path)
    try:
        return median_seconds(lambda: PreparedDataset(directory), repeats)
    finally:
        dataset_module.os.listdir = listdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="samples per step on this rank (default 256)")
    parser.add_argument("--seq-len", type=int, default=2047, help="tokens per sample - 1 (default 2047)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-mb", type=float, default=16.0, help="synthetic corpus size (default 16 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        words = 100
        documents = synthetic_documents(int(args.text_mb * 1e6 / (words * 7)), words, seed=0)
        write_corpus(os.path.join(scratch, "corpus"), documents, "jsonl")
        directory = os.path.join(scratch, "prepared")
        manifest = prepare_dataset([os.path.join(scratch, "corpus")], directory, "byte", args.seq_len,
                                   shard_bytes=4 << 20, progress=False)
        print(f"dataset: {manifest.num_samples} samples of {args.seq_len}+1 byte tokens in {len(manifest.shards)} "
              f"shards; step = {args.batch} samples; medians of {args.repeats} runs of {args.steps} steps")
        print(f"{'data.verify':<12} {'ms/step':>9} {'+ms':>7} {'+%':>6}   {'reopen every read: ms/step':>27} {'+ms':>7}")
        base = reopen_base = None
        for verify in VERIFY_LEVELS:
            cached, reopened = step_ms(directory, args, verify), step_ms(directory, args, verify, max_open_shards=1)
            base = cached if base is None else base
            reopen_base = reopened if reopen_base is None else reopen_base
            print(f"{verify:<12} {cached:>9.2f} {cached - base:>7.2f} {100 * (cached - base) / base:>6.1f}   "
                  f"{reopened:>27.2f} {reopened - reopen_base:>7.2f}", flush=True)
        size_mb = sum(shard["bytes"] for shard in read_manifest(directory).shards) / 1e6
        seconds = median_seconds(lambda: PreparedDataset(directory, verify="none").verify_all(), args.repeats)
        print(f"data verify (whole-file sha256): {size_mb / seconds:.0f} MB/s over {size_mb:.0f} MB")
        print(f"open a 10^5-shard, 10^12-token manifest: {manifest_open_seconds(scratch, args.repeats):.2f} s")


if __name__ == "__main__":
    main()
