"""The recipes past 760M: they validate for their stated world size, their parameter count is
within 3% of their name, the planner says they fit their stated hardware, and the planner's
numbers in each header are what the planner says now (a planner change must rewrite them)."""

from __future__ import annotations

import re

import pytest

from titans_train.config import list_recipes, load_recipe, model_config
from titans_train.model.cli import count_parameters
from titans_train.plan import DEVICES, Hardware, evaluate, run_shape
from titans_train.plan.planner import layout_of
from titans_train.config.loading import resolve_recipe_path

HEADER_PLAN = re.compile(r"(\d+\.\d) GiB per GPU of\n#   (\d+\.\d) usable; step (\d+\.\d+) s, ([\d.]+)M tokens/s, "
                         r"([\d.]+) days")
SCALE = re.compile(r"^(mac|mag|transformer|lmm|mal)-(1\.3|3|7|13)b(-\d+t)?$")
RECIPES = [name for name in list_recipes() if SCALE.match(name)]


def test_every_variant_has_every_size():
    for variant in ("mac", "mag", "transformer"):
        for size in ("1.3b", "3b", "7b", "13b"):
            assert f"{variant}-{size}" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_counts_and_fits(name):
    header = resolve_recipe_path(name).read_text()
    nodes = int(re.search(r"Hardware: (\d+) node", header).group(1))
    config = load_recipe(name, world_size=8 * nodes)  # raises on a layout that cannot split
    target = float(SCALE.match(name).group(2)) * 1e9
    parameters = count_parameters(model_config(config))["total"]
    assert abs(parameters / target - 1) < 0.03, parameters
    plan = evaluate(run_shape(config), Hardware(DEVICES["h100-80gb"], nodes, 8), layout_of(config))
    assert plan.fits, (plan.peak_bytes, plan.usable_bytes)
    times = {term.name: term.value for term in plan.time}
    written = HEADER_PLAN.search(header)
    assert written, f"{name}: no planner line in the header"
    assert written.groups() == (f"{plan.peak_bytes / 2**30:.1f}", f"{plan.usable_bytes / 2**30:.1f}",
                                f"{times['step s']:.2f}", f"{times['tokens per s'] / 1e6:.2f}",
                                f"{times['days to token budget']:.1f}"), name
