"""Memory held between forward and backward, with and without activation checkpointing.

    .venv/bin/python benchmarks/activation_memory.py                 # every variant, T=1024
    .venv/bin/python benchmarks/activation_memory.py --variants lmm transformer --seq-len 2048

For each variant: the bytes a training forward leaves allocated for its backward (net CPU
allocations during the forward, from the PyTorch profiler's memory tracking), plainly and with
one checkpoint per layer (what `parallel.activation_checkpointing` does), and their ratio.
Deterministic: the same run prints the same bytes. The profiler logs its start and stop on
stderr (`2>/dev/null` hides them).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from titans_train.model import VARIANTS, TitansConfig, TitansLM


def forward_loss(model: TitansLM, tokens: torch.Tensor, activation_checkpointing: bool) -> torch.Tensor:
    """The training forward through the model's layer-level API, as the trainer runs it."""
    hidden = model.embed_tokens(tokens[:, :-1])
    for layer in model.layers:
        if activation_checkpointing:
            hidden, _ = checkpoint(layer, hidden, None, 0, use_reentrant=False)
        else:
            hidden, _ = layer(hidden, None, 0)
    logits = model.final_logits(hidden)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def held_after_forward(model: TitansLM, tokens: torch.Tensor, activation_checkpointing: bool) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss = forward_loss(model, tokens, activation_checkpointing)
    held = sum(event.self_cpu_memory_usage for event in profiler.key_averages())
    loss.backward()  # the backward really runs from what was kept
    model.zero_grad(set_to_none=True)
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"dim {args.dim}, {args.n_layers} layers, batch {args.batch} x {args.seq_len} tokens, fp32")
    print(f"{'variant':12s} {'plain MiB':>10s} {'checkpointed MiB':>17s} {'ratio':>6s}")
    for variant in args.variants:
        torch.manual_seed(0)
        model = TitansLM(TitansConfig(variant=variant, vocab_size=256, dim=args.dim, n_layers=args.n_layers,
                                      n_heads=args.n_heads, chunk_size=64, segment_len=128, window=256))
        tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
        plain = held_after_forward(model, tokens, activation_checkpointing=False)
        checkpointed = held_after_forward(model, tokens, activation_checkpointing=True)
        print(f"{variant:12s} {plain / 2**20:10.1f} {checkpointed / 2**20:17.1f} {checkpointed / plain:6.2f}")


if __name__ == "__main__":
    main()
