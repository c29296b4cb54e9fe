"""Study files: every error names its key before any run starts; the plan counts what it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from titans_train.config import ConfigError, UnknownKeyError, load_recipe, model_config
from titans_train.model.cli import count_parameters
from titans_train.model.flops import flops_per_token
from titans_train.study.expressions import evaluate
from titans_train.study.plan import plan_study
from titans_train.study.spec import load_study

GOOD = """
name: tiny
recipe: debug
overrides: {train.eval_batches: 1}
axes:
  widths: [16, 32]
  flops: [1.0e9]
  variants:
    - {name: mac}
    - {name: transformer, overrides: {model.variant: transformer}}
derived:
  model.n_heads: "dim // 16"
  train.warmup_steps: "max(1, steps // 10)"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def _plan(tmp_path: Path, text: str):
    study, path = load_study(_write(tmp_path, text))
    return plan_study(study, path, runs_dir=str(tmp_path / "runs"))


def test_plan_counts_parameters_tokens_and_flops_like_the_model_tools(tmp_path):
    runs = _plan(tmp_path, GOOD)
    assert [r.name for r in runs] == ["mac-d16-c1e9", "transformer-d16-c1e9", "mac-d32-c1e9", "transformer-d32-c1e9"]
    for run in runs:
        config = load_recipe(run.recipe, run.overrides, world_size=1)
        titans = model_config(config)
        counts = count_parameters(titans)
        assert run.params == counts["total"]
        assert run.non_embedding_params == counts["total"] - counts["embedding"]  # tied head
        assert run.flops_per_token == pytest.approx(flops_per_token(titans, 64))
        assert run.tokens >= config.train.tokens > run.tokens - 256  # whole steps of 256 tokens
        assert run.tokens == run.steps * 256 and run.flops == pytest.approx(run.tokens * run.flops_per_token)
        assert abs(run.flops - 1e9) <= 256 * run.flops_per_token  # the budget, to one step
        assert config.train.warmup_steps == max(1, run.steps // 10)
        assert config.model.n_heads == config.model.dim // 16
        assert config.logging.wandb_group == "tiny" and config.run_dir == str(tmp_path / "runs" / run.name)
    # The memory update is counted: MAC of the same width costs more per parameter.
    assert runs[0].flops_per_token / runs[0].params > runs[1].flops_per_token / runs[1].params


@pytest.mark.parametrize("edit, key, words", [
    (("widths: [16, 32]", "widths: [16, 32]\n  depths: [2]"), "axes.depths", "unknown key"),
    (("widths: [16, 32]", "widths: []"), "axes.sizes", "grid is empty"),
    (("flops: [1.0e9]", "flops: []"), "axes.tokens", "grid is empty"),
    (("flops: [1.0e9]", "flops: [1.0e9]\n  tokens: [1000]"), "axes.flops", "not both"),
    (("- {name: mac}", "- {name: mac, overides: {}}"), "axes.variants[0].overides", "unknown key"),
    (("recipe: debug", "recipe: debugg"), "recipe", "did you mean debug"),
    (('"max(1, steps // 10)"', '"steps * 2"'), "derived.train.warmup_steps", "warmup steps >="),
    (('"max(1, steps // 10)"', '"stepz // 10"'), "derived.train.warmup_steps", "did you mean 'steps'"),
    (('"dim // 16"', '"dim // 5"'), "derived.model.n_heads", "not divisible"),
    (("train.eval_batches: 1", "train.eval_batchez: 1"), "overrides.train.eval_batchez", "unknown key"),
    (("model.variant: transformer", "model.variant: transformr"), "axes.variants[1].overrides.model.variant", "unknown variant"),
    (("widths: [16, 32]", "widths: [16, -32]"), "axes.widths[1]", "must be > 0"),
])
def test_bad_study_errors_name_the_key_before_any_run(tmp_path, edit, key, words):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError) as error:
        _plan(tmp_path, GOOD.replace(old, new))
    assert error.value.key == key, str(error.value)
    assert words in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_unknown_axis_suggests_the_nearest(tmp_path):
    with pytest.raises(UnknownKeyError) as error:
        load_study(_write(tmp_path, GOOD.replace("widths:", "width:")))
    assert error.value.key == "axes.width" and "axes.widths" in str(error.value)


def test_named_recipe_sizes_take_the_recipes_model(tmp_path):
    text = GOOD.replace("widths: [16, 32]", "sizes: [{recipe: tiny-mac-cpu}, {name: small, dim: 16, n_layers: 1, n_heads: 1}]")
    text = text.replace('  model.n_heads: "dim // 16"\n', "").replace("flops: [1.0e9]", "flops: [1.0e11]")
    runs = _plan(tmp_path, text)
    sizes = {r.size: r for r in runs if r.variant == "mac"}
    assert set(sizes) == {"tiny-mac-cpu", "small"}
    tiny = model_config(load_recipe("tiny-mac-cpu", world_size=None))
    assert sizes["tiny-mac-cpu"].params == count_parameters(tiny)["total"]


def test_expressions_are_arithmetic_only():
    assert evaluate("k", "max(2, dim // 16) + 0.5 * 2", {"dim": 64}) == 5
    assert evaluate("k", "3e-3 * (n / 1e4) ** -0.5 if n > 0 else 1", {"n": 4e4}) == pytest.approx(1.5e-3)
    for bad in ("__import__('os')", "dim.real", "[1, 2]", "1 / 0"):
        with pytest.raises(ConfigError) as error:
            evaluate("derived.x", bad, {"dim": 1})
        assert error.value.key == "derived.x"


def test_lr_axis_and_batch_derived_from_compute(tmp_path):
    text = GOOD.replace("flops: [1.0e9]", "flops: [1.0e9, 4.0e9]\n  lr: [1.0e-3, 3.0e-3]").replace(
        "derived:\n", 'derived:\n  train.global_batch_tokens: "256 if compute < 2e9 else 512"\n')
    runs = _plan(tmp_path, text)
    assert len(runs) == 2 * 2 * 2 * 2
    for run in runs:
        config = load_recipe(run.recipe, run.overrides, world_size=1)
        assert run.name.endswith(f"-lr{run.lr:g}") and config.train.lr == run.lr
        batch = 256 if run.budget == "c1e9" else 512
        assert config.train.global_batch_tokens == batch and run.tokens == run.steps * batch
        assert config.train.warmup_steps == max(1, run.steps // 10)  # `steps` follows the derived batch
