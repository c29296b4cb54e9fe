"""Data pipeline throughput next to what training consumes on this machine.

    .venv/bin/python benchmarks/data.py                 # stdlib corpus, byte + BPE tokenizer
    .venv/bin/python benchmarks/data.py --repeats 5 --loader-steps 400

Prints medians over --repeats runs of:
- prepare throughput, MB/s of UTF-8 text, on the built-in corpus's files (real Python source,
  ~6.9 MB on Python 3.11) with 1 worker and with all cores, for the byte tokenizer (seq_len 256
  and 4096) and for a BPE tokenizer trained here with the `tokenizers` library;
- loader throughput, tokens/s for one data-parallel rank, with 0 and 2 workers, at the
  tiny-mac-cpu recipe's shape (micro batch 16 x seq_len 256) and at a GPU recipe's shape
  (micro batch 4 x seq_len 4096);
- the training consumption it must keep up with: tokens/s of one forward + backward + AdamW step
  of the tiny-mac-cpu model (recipes/tiny-mac-cpu.yaml), measured in the same process after one
  warm-up step (--train-repeats steps; its median).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from titans_train.data.builtin import SHARD_BYTES, stdlib_files
from titans_train.data.loader import TokenLoader
from titans_train.data.prepare import prepare_dataset
from titans_train.data.train_tokenizer import train_tokenizer

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny-mac-cpu.yaml")


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prepare(files, tokenizer, seq_len, workers, repeats, scratch) -> tuple[float, float]:
    """(MB/s of text, text MB) of a full prepare into a fresh directory (4 MiB shards, as builtin)."""
    text_mb = 0.0

    def once():
        nonlocal text_mb
        out = tempfile.mkdtemp(dir=scratch)
        manifest = prepare_dataset(files, out, tokenizer, seq_len, shard_bytes=SHARD_BYTES,
                                   num_workers=workers, progress=False)
        text_mb = manifest.text_bytes / 1e6
        shutil.rmtree(out)

    seconds = median_time(once, repeats)
    return text_mb / seconds, text_mb


def bench_loader(directory, seq_len, micro, workers, steps, repeats) -> float:
    """tokens/s of one data-parallel rank (of 2) reading `steps` micro-batches."""
    loader = TokenLoader(directory, seq_len=seq_len, global_batch_size=micro * 2, micro_batch_size=micro,
                         dp_rank=1, dp_world_size=2, num_workers=workers, seed=0)

    def once():
        for batch in itertools.islice(loader, steps):
            assert batch.shape == (micro, seq_len + 1)

    return steps * micro * seq_len / median_time(once, repeats)


def bench_training(repeats: int) -> tuple[float, str]:  # one warm-up step, then `repeats`
    """tokens/s of the tiny-mac-cpu model's training step (fwd + bwd + AdamW), and a description."""
    from omegaconf import OmegaConf

    from titans_train.model import TitansConfig, TitansLM

    recipe = OmegaConf.load(RECIPE)
    config = TitansConfig(**OmegaConf.to_container(recipe.model))
    micro, seq_len = recipe.train.micro_batch_size, recipe.train.seq_len
    torch.manual_seed(0)
    model = TitansLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (micro, seq_len + 1))

    def step():
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = median_time(step, repeats)
    return micro * seq_len / seconds, f"tiny-mac-cpu train step, {micro} x {seq_len} tokens, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-steps", type=int, default=200)
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--train-repeats", type=int, default=1, help="measured training steps (slow on CPU)")
    args = parser.parse_args()
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, f) for f in stdlib_files(stdlib)]
    cores = os.cpu_count() or 1
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {cores} cores, "
          f"median of {args.repeats} runs", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        bpe = os.path.join(scratch, "bpe.json")
        start = time.perf_counter()
        train_tokenizer(files, bpe, args.bpe_vocab)
        print(f"trained BPE vocab {args.bpe_vocab} on the corpus in {time.perf_counter() - start:.1f} s")
        print(f"{'prepare':<40} {'MB/s text':>10}")
        for name, spec, seq_len in (("byte", "byte", 256), (f"bpe-{args.bpe_vocab}", bpe, 256),
                                    ("byte", "byte", 4096)):
            for workers in sorted({1, cores}):
                rate, text_mb = bench_prepare(files, spec, seq_len, workers, args.repeats, scratch)
                label = f"{name}, seq {seq_len}, {workers} worker(s), {text_mb:.1f} MB"
                print(f"{label:<40} {rate:>10.2f}", flush=True)

        small = os.path.join(scratch, "seq256")
        prepare_dataset(files, small, "byte", 256, progress=False)
        large = os.path.join(scratch, "seq4096")
        prepare_dataset(files, large, "byte", 4096, progress=False)
        print(f"{'loader (one dp rank of 2)':<40} {'tokens/s':>10}")
        loader_rates = {}
        for directory, seq_len, micro in ((small, 256, 16), (large, 4096, 4)):
            for workers in (0, 2):
                rate = bench_loader(directory, seq_len, micro, workers, args.loader_steps, args.repeats)
                loader_rates[(seq_len, workers)] = rate
                print(f"{f'micro {micro} x seq {seq_len}, {workers} workers':<40} {rate:>10.0f}", flush=True)

    try:
        train_rate, description = bench_training(args.train_repeats)
    except Exception as error:  # the model is another package; report, don't hide
        print(f"training step not measured: {type(error).__name__}: {error}")
        return
    print(f"{'training consumes':<40} {'tokens/s':>10}")
    print(f"{description:<40} {train_rate:>10.0f}")
    print(f"loader / training (micro 16 x 256, 0 workers): {loader_rates[(256, 0)] / train_rate:.0f}x")


if __name__ == "__main__":
    main()
