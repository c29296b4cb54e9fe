"""Sliding-window attention, forward + backward, in query blocks of each size against one whole mask.

    .venv/bin/python benchmarks/window_attention.py --threads 2
    .venv/bin/python benchmarks/window_attention.py --shapes 2048:512 4096:1024 --blocks 128 256 512

One `Attention` module (model_step.py's head count and width, persistent tokens on, as in mag and
mal) runs a (T, window) pair on random input from position 0; `whole` is one SDPA call with the
(T, T + persistent) mask, each block size B the queries in blocks of B, each over the keys its
window reaches (`Attention.window_query_block`). Medians of --reps rounds, the layouts taking
turns each round; the ratio is whole / blocked, measured in the same process.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from titans_train.model.attention import Attention


def parse_shape(text: str) -> tuple[int, int]:
    seq_len, window = text.split(":")
    return int(seq_len), int(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1024, 512), (2048, 512), (2048, 1024)],
                        metavar="T:WINDOW")
    parser.add_argument("--blocks", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--persistent", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = Attention(args.dim, args.n_heads, args.dim // args.n_heads, args.persistent, rope_base=10000.0)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    print(f"torch {torch.__version__}, {args.threads} threads, dim {args.dim}, {args.n_heads} heads, "
          f"{args.persistent} persistent tokens, batch 1, {args.reps} rounds; ms forward + backward")
    print(f"{'T':>6} {'window':>7} {'whole':>8} " + " ".join(f"{'B ' + str(b):>8} {'ratio':>6}" for b in args.blocks))
    for seq_len, window in args.shapes:
        x = torch.randn(1, seq_len, args.dim, requires_grad=True)
        state = {name: torch.zeros(1, args.n_heads, 0, args.dim // args.n_heads) for name in ("keys", "values")}
        layouts = {"whole": seq_len, **{b: b for b in args.blocks}}  # a block of T queries is one call
        times = collections.defaultdict(list)
        for round_index in range(args.reps + 2):  # two warm-up rounds
            for name, block in layouts.items():
                module.window_query_block = block
                start = time.perf_counter()
                module(x, state, 0, window)[0].sum().backward()
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
        whole = statistics.median(times["whole"]) * 1e3
        cells = []
        for block in args.blocks:
            blocked = statistics.median(times[block]) * 1e3
            cells.append(f"{blocked:>8.1f} {whole / blocked:>6.2f}")
        print(f"{seq_len:>6} {window:>7} {whole:>8.1f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
