"""`titans-train config show RECIPE [key=value ...]`: print the resolved, validated config.

`titans-train config list` names the installed recipes.
"""

from __future__ import annotations

import argparse

from titans_train.config import list_recipes, load_recipe, to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the resolved config of a recipe with overrides applied")
    show.add_argument("recipe", help="a recipe name (see `config list`) or a YAML path")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    show.add_argument("--world-size", type=int, default=1,
                      help="number of processes to check the batch arithmetic against (default 1)")
    sub.add_parser("list", help="list the installed recipes")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print("\n".join(list_recipes()))
        return 0
    config = load_recipe(args.recipe, args.overrides, world_size=args.world_size)
    print(to_yaml(config), end="")
    return 0
