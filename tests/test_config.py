"""Recipes load, compose and override; bad configs fail before any work, naming the key."""

from __future__ import annotations

import re

import pytest

from titans_train.cli import main as cli_main
from titans_train.config import (
    BatchArithmeticError,
    InvalidValueError,
    RecipeNotFoundError,
    UnknownKeyError,
    batch_plan,
    list_recipes,
    load_recipe,
    model_config,
)
from titans_train.model.cli import count_parameters

PAPER_RECIPES = [name for name in list_recipes() if re.fullmatch(r"(lmm|mac|mag|mal|transformer)-\d+m", name)]


def test_every_paper_size_and_variant_has_a_recipe():
    expected = {f"{v}-{s}" for v in ("lmm", "mac", "mag", "mal", "transformer") for s in ("170m", "340m", "400m", "760m")}
    assert expected <= set(PAPER_RECIPES)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_size_matches_its_name_and_the_paper_recipe(name):
    config = load_recipe(name, world_size=8)
    target = int(name.rsplit("-", 1)[1][:-1]) * 1e6
    total = count_parameters(model_config(config))["total"]  # meta device: nothing allocated
    assert abs(total - target) / target < 0.10, f"{name}: {total / 1e6:.1f}M parameters"
    train = config.train
    assert (train.lr, train.schedule, train.weight_decay, train.seq_len) == (4e-4, "cosine", 0.1, 4096)
    assert train.global_batch_tokens == 524288
    assert train.tokens == (30e9 if name.endswith("760m") else 15e9)
    assert config.model.variant == name.split("-")[0]


def test_all_recipes_resolve_on_one_process():
    for name in list_recipes():
        load_recipe(name, world_size=None)


def test_overrides_take_precedence_and_are_typed():
    config = load_recipe("debug", ["train.lr=1e-3", "model.n_layers=3", "train.betas=[0.8,0.9]"])
    assert config.train.lr == 1e-3 and config.model.n_layers == 3 and list(config.train.betas) == [0.8, 0.9]
    assert config.run_dir == "runs/debug" and config.checkpoint.dir == "runs/debug/checkpoints"


def test_composition_order_base_then_file_then_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 1.0e-3, seed: 7}\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\ntrain: {lr: 2.0e-3}\n")
    (tmp_path / "run.yaml").write_text("base: [debug, b.yaml]\ntrain: {seed: 9}\n")
    config = load_recipe(str(tmp_path / "run.yaml"))
    assert config.train.lr == 2e-3 and config.train.seed == 9 and config.model.dim == 32  # from debug
    assert config.name == "run"
    assert load_recipe(str(tmp_path / "run.yaml"), ["train.seed=1"]).train.seed == 1


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(InvalidValueError, match="include each other"):
        load_recipe(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("train.lr_schedule=wsd", "train.lr_schedule", "train.schedule"),
        ("model.n_head=4", "model.n_head", "model.n_heads"),
        ("lr=0.1", "lr", "train.lr"),
        ("checkpoint.keep_lst=2", "checkpoint.keep_lst", "checkpoint.keep_last"),
    ],
)
def test_unknown_key_names_the_key_and_the_nearest_valid_one(override, key, suggestion):
    with pytest.raises(UnknownKeyError) as info:
        load_recipe("debug", [override])
    assert info.value.key == key and suggestion in str(info.value)


def test_unknown_key_inside_a_recipe_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("base: [debug]\nparallel: {zero_stag: 2}\n")
    with pytest.raises(UnknownKeyError, match=r"parallel\.zero_stag: unknown key; did you mean parallel\.zero_stage"):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_wrong_type_names_the_key():
    with pytest.raises(InvalidValueError) as info:
        load_recipe("debug", ["model.dim=wide"])
    assert info.value.key == "model.dim"


def test_invalid_choice_suggests_the_nearest():
    with pytest.raises(InvalidValueError, match="did you mean 'cosine'"):
        load_recipe("debug", ["train.schedule=cosin"])


def test_global_batch_not_a_multiple_of_seq_len():
    with pytest.raises(BatchArithmeticError) as info:
        load_recipe("debug", ["train.global_batch_tokens=300"])
    assert info.value.key == "train.global_batch_tokens"
    assert "not a multiple of train.seq_len=64" in str(info.value) and "256 or 320" in str(info.value)


def test_global_batch_not_divisible_by_micro_batch_times_data_parallel():
    # 4 samples per step = 2 per micro-batch x 2 ranks: fine on 2, impossible on 4 processes.
    assert batch_plan(load_recipe("debug", world_size=2), 2).gradient_accumulation_steps == 1
    with pytest.raises(BatchArithmeticError) as info:
        load_recipe("debug", world_size=4)
    message = str(info.value)
    assert info.value.key == "train.global_batch_tokens"
    assert "4 samples" in message and "train.micro_batch_size=2 x data-parallel size 4 = 8" in message


def test_world_not_divisible_by_model_parallel():
    with pytest.raises(BatchArithmeticError, match="world size 3 is not divisible by parallel.tp x parallel.sp"):
        load_recipe("debug", ["parallel.tp=2"], world_size=3)


def test_tp_not_dividing_heads_names_parallel_tp():
    with pytest.raises(InvalidValueError) as info:
        load_recipe("mac-170m", ["parallel.tp=4"], world_size=8)
    assert info.value.key == "parallel.tp" and "model.n_heads = 14" in str(info.value)


def test_model_errors_are_named_with_their_section():
    with pytest.raises(InvalidValueError) as info:
        load_recipe("debug", ["model.dim=33"])
    assert info.value.key == "model.n_heads"


def test_tokens_and_steps_are_exclusive_and_steps_are_derived_from_tokens():
    with pytest.raises(InvalidValueError, match="exactly one of train.tokens and train.steps"):
        load_recipe("debug", ["train.tokens=1000"])
    plan = batch_plan(load_recipe("mac-170m", world_size=8), 8)
    assert plan.total_steps == -(-15_000_000_000 // 524288) and plan.gradient_accumulation_steps == 4


def test_unknown_recipe_suggests_names():
    with pytest.raises(RecipeNotFoundError, match="mac-170m"):
        load_recipe("mac-17m")


def test_config_show_cli(capsys):
    assert cli_main(["config", "show", "debug", "train.lr=0.002"]) == 0
    assert "lr: 0.002" in capsys.readouterr().out
    assert cli_main(["config", "show", "debug", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key; did you mean train.lr?" in capsys.readouterr().err


def test_model_info_cli(capsys):
    assert cli_main(["model", "info", "mac-760m"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "FLOPs/token" in out


def test_train_cli_fails_before_any_work(capsys, tmp_path):
    import torch.distributed as dist

    code = cli_main(["train", "debug", f"run_dir={tmp_path / 'run'}", "train.micro_batch_size=3"])
    assert code == 2
    assert "train.global_batch_tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_sequence_parallel_span_must_hold_whole_chunks():
    with pytest.raises(InvalidValueError) as info:
        load_recipe("mac-170m", ["parallel.sp=3"], world_size=3)
    assert info.value.key == "parallel.sp"


def test_every_zero_stage_is_accepted_with_sequence_parallel():
    for stage in (0, 1, 2, 3):  # parallel/zero.py keeps ZeRO's collectives out of the wavefront
        config = load_recipe("mac-170m", ["parallel.sp=2", f"parallel.zero_stage={stage}"], world_size=2)
        assert config.parallel.zero_stage == stage
