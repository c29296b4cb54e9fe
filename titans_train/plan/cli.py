"""`titans-train plan RECIPE --nodes N --gpus-per-node G --gpu NAME [layout options] [--search] [--json]`.

Per-GPU memory by term, communication per step by kind, step time, tokens/s and days to the
recipe's token budget. Layout options default to the recipe's own. Nothing is allocated: the
model is read on the meta device. Exit code 0 when the layout fits, 1 when it does not, 2 on a
bad recipe or option.
"""

from __future__ import annotations

import argparse
import json
import sys

from titans_train.config import load_recipe

from .devices import DEVICES, GIB
from .planner import DEFAULT_MFU, Hardware, Plan, PlanError, evaluate, layout_of, run_shape
from .search import advise, search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.seq_len=8192")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(DEVICES), default="h100-80gb")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default: the recipe's)")
    parser.add_argument("--sp", type=int, help="sequence-parallel size (default: the recipe's)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default: the recipe's)")
    parser.add_argument("--micro-batch", type=int, help="micro batch per GPU (default: the recipe's)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tp-sequence-sharding", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"fraction of peak FLOP/s the kernels reach while computing (default {DEFAULT_MFU})")
    parser.add_argument("--search", action="store_true", help="rank every layout that fits by throughput")
    parser.add_argument("--top", type=int, default=10, help="with --search: how many to print")
    parser.add_argument("--json", action="store_true", help="one JSON object (top-level `fits`)")


def _layout(args, config):
    layout = layout_of(config)
    changes = {"tp": args.tp, "sp": args.sp, "zero_stage": args.zero, "micro_batch": args.micro_batch,
               "activation_checkpointing": args.activation_checkpointing,
               "tp_sequence_sharding": args.tp_sequence_sharding}
    from dataclasses import replace

    return replace(layout, **{key: value for key, value in changes.items() if value is not None})


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_plan(plan: Plan, recipe: str) -> str:
    layout, hardware = plan.layout, plan.hardware
    lines = [f"plan: {recipe} on {hardware.nodes} x {hardware.gpus_per_node} {hardware.device.name} "
             f"({plan.facts.parameters / 1e9:.2f}B parameters)",
             f"layout: tp {layout.tp} x sp {layout.sp} x dp {plan.dp}, ZeRO-{layout.zero_stage}, micro batch "
             f"{layout.micro_batch} x {plan.accumulation} accumulation, activation checkpointing "
             f"{'on' if layout.activation_checkpointing else 'off'}"
             + (", tp sequence sharding" if layout.tp_sequence_sharding else ""),
             "memory per GPU:"]
    lines += [f"  {term.name:<30s} {_gib(term.value)}   {term.formula}" for term in plan.memory]
    lines.append(f"  {'total':<30s} {_gib(plan.peak_bytes)}   of {plan.usable_bytes / GIB:.2f} GiB usable: "
                 + ("fits" if plan.fits else "DOES NOT FIT"))
    lines.append("communication per optimizer step, bytes one GPU sends:")
    lines += [f"  {term.name:<30s} {term.value / 1e9:10.3f} GB   {term.formula}" for term in plan.communication]
    if not plan.communication:
        lines.append("  none (one GPU)")
    lines.append("time:")
    lines += [f"  {term.name:<30s} {term.value:12.4g}   {term.formula}" for term in plan.time]
    lines += plan.advice
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_recipe(args.recipe, args.overrides, world_size=None)  # a ConfigError: the CLI's one line
    for option in ("nodes", "gpus_per_node"):
        if getattr(args, option) < 1:
            print(f"plan error: --{option.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not 0 < args.mfu <= 1:
        print(f"plan error: --mfu must be in (0, 1], got {args.mfu}", file=sys.stderr)
        return 2
    hardware = Hardware(DEVICES[args.gpu], args.nodes, args.gpus_per_node)
    run_ = run_shape(config)
    if args.search:
        plans = search(run_, hardware, args.mfu)
        if args.json:
            print(json.dumps({"fits": bool(plans), "layouts": [p.to_dict() for p in plans[:args.top]]}, indent=1))
        elif not plans:
            print(f"no layout fits {args.recipe} on {hardware.world_size} x {args.gpu}: add GPUs (--nodes) "
                  "or choose a GPU with more memory (--gpu)")
        else:
            print(f"{len(plans)} layouts fit {args.recipe} on {hardware.nodes} x {hardware.gpus_per_node} "
                  f"{args.gpu}; fastest first:")
            print(f"{'tp':>3} {'sp':>3} {'dp':>4} {'zero':>4} {'micro':>5} {'ckpt':>4} {'GiB/GPU':>8} "
                  f"{'tokens/s':>12} {'MFU':>5} {'days':>7}")
            for plan in plans[:args.top]:
                lay = plan.layout
                print(f"{lay.tp:>3} {lay.sp:>3} {plan.dp:>4} {lay.zero_stage:>4} {lay.micro_batch:>5} "
                      f"{'on' if lay.activation_checkpointing else 'off':>4} {plan.peak_bytes / GIB:8.1f} "
                      f"{plan.term('tokens per s'):12,.0f} {plan.term('achieved MFU'):5.2f} "
                      f"{plan.term('days to token budget'):7.1f}")
        return 0 if plans else 1
    try:
        plan = evaluate(run_, hardware, _layout(args, config), args.mfu)
    except PlanError as error:
        print(f"plan error: {error}", file=sys.stderr)
        return 2
    if not plan.fits:
        plan.advice = advise(run_, hardware, plan, args.mfu)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan, args.recipe))
    return 0 if plan.fits else 1
