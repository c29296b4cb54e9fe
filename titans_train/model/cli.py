"""`titans-train model info RECIPE [key=value ...]`: parameter count and training FLOPs per token.

The model is built on the meta device: no memory is allocated, so a 7B recipe is inspected in
a second on a laptop.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from titans_train.config import load_recipe, model_config


def count_parameters(titans_config) -> dict[str, int]:
    """{"total": unique parameters (tied weights once), "embedding": ..., per top-level module}."""
    from titans_train.model import TitansLM

    with torch.device("meta"):
        model = TitansLM(titans_config)
    by_module: Counter[str] = Counter()
    for name, param in model.named_parameters():  # yields a tied tensor once
        by_module[name.split(".")[0]] += param.numel()
    return {"total": sum(by_module.values()), **by_module}


def training_flops_per_token(titans_config, seq_len: int) -> float:
    from titans_train.model.flops import flops_per_token

    return float(flops_per_token(titans_config, seq_len))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="parameter count and FLOPs/token of a recipe's model")
    info.add_argument("recipe", help="a recipe name or YAML path")
    info.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layers=12")


def run(args: argparse.Namespace) -> int:
    config = load_recipe(args.recipe, args.overrides, world_size=None)
    titans_config = model_config(config)
    counts = count_parameters(titans_config)
    flops = training_flops_per_token(titans_config, config.train.seq_len)
    print(f"recipe:            {args.recipe}")
    print(f"variant:           {titans_config.variant}")
    print(f"parameters:        {counts['total']:,} ({counts['total'] / 1e6:.1f}M)")
    for module, count in counts.items():
        if module != "total":
            print(f"  {module + ':':<16} {count:,}")
    print(f"seq_len:           {config.train.seq_len}")
    print(f"train FLOPs/token: {flops:.4g} (forward + backward, memory updates included)")
    tokens = config.train.tokens or config.train.steps * config.train.global_batch_tokens
    print(f"run tokens:        {tokens:,} -> {flops * tokens:.3g} FLOPs")
    return 0
