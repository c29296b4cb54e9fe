"""In-training evaluation is layout-independent: validation is over a fixed set of samples and
`train.eval_tasks` over fixed items, so 1 and 2 processes report the same numbers.

The validation set is the first eval_batches x micro_batch_size samples whatever the layout;
eval_batches=3 with 2 data-parallel ranks leaves each rank a padded last round (weight 0), and
ZeRO-3 needs every rank's forward passes in lockstep. (Before, each rank averaged eval_batches
micro-batches of its own, so 2 ranks validated on twice as many samples as 1.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed import run_distributed
from eval_fixtures import SEQ_LEN, prepare_held_out

TASKS = ["train.eval_tasks=[ppl,mqar]", "train.eval_lengths=[1x]"]
# The 2-process layouts evaluate at the start and the end only (steps 0 and 2), to keep the test
# short; the one-process reference also at step 1 (train.eval_interval=1).
LAYOUTS = {"dp2-zero3": ["parallel.zero_stage=3", "train.eval_interval=0", *TASKS],
           "tp2": ["parallel.tp=2", "parallel.zero_stage=1", "train.eval_interval=0", *TASKS]}


def _common(root: Path, data: str) -> list[str]:
    return ["train.steps=2", "train.eval_interval=1", "train.eval_batches=3", "checkpoint.save_final=false",
            "data.source=shards", f"data.train_dir={data}", f"data.validation_dir={data}", f"train.seq_len={SEQ_LEN}"]


def evaluation_rank(root: str, data: str, layouts: dict[str, list[str]]) -> dict:
    from titans_train.config import load_recipe
    from titans_train.train.trainer import train

    out = {}
    for name, overrides in layouts.items():
        config = load_recipe("debug", [f"run_dir={Path(root) / name}", *_common(Path(root), data), *overrides],
                             world_size=None)
        result = train(config)
        out[name] = {"validation": result.validation, "tasks": result.eval_tasks}
    return out


def test_validation_and_eval_tasks_are_the_same_on_one_and_two_processes(tmp_path):
    data = prepare_held_out(tmp_path)
    (one,) = run_distributed("test_eval_validation:evaluation_rank", 1, 240, init_process_group=False,
                             root=str(tmp_path / "one"), data=data, layouts={"one": ["parallel.zero_stage=0", *TASKS]})
    two = run_distributed("test_eval_validation:evaluation_rank", 2, 300, init_process_group=False,
                          root=str(tmp_path / "two"), data=data, layouts=LAYOUTS)
    reference = one["one"]
    assert sorted(reference["validation"]) == sorted(reference["tasks"]) == [0, 1, 2]  # start, periodic, end
    assert {"eval/ppl/loss", "eval/ppl/len64/loss", "eval/mqar/accuracy", "eval/mqar/length64/accuracy"} <= set(
        reference["tasks"][2])
    for name in LAYOUTS:
        assert sorted(two[0][name]["validation"]) == sorted(two[0][name]["tasks"]) == [0, 2], name
        assert two[0][name] == two[1][name], name  # every rank reports the global numbers
        assert set(two[0][name]["validation"]) <= set(reference["validation"]), name
        for step, loss in two[0][name]["validation"].items():
            assert loss == pytest.approx(reference["validation"][step], rel=1e-5), (name, step)
    for name in LAYOUTS:
        assert set(two[0][name]["tasks"]) <= set(reference["tasks"]), name
        for step, metrics in two[0][name]["tasks"].items():
            assert metrics == pytest.approx(reference["tasks"][step], rel=1e-5), (name, step)
    logged = [json.loads(line) for line in (tmp_path / "one" / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged if "eval/mqar/accuracy" in record] == [0, 1, 2]


@pytest.mark.parametrize("overrides, key", [
    (["train.eval_tasks=[ppl,needle]"], "train.eval_tasks"),
    (["train.eval_tasks=[niah]", "train.eval_lengths=[4y]"], "train.eval_lengths"),
    (["train.eval_tasks=[niah]", "parallel.tp=2", "parallel.tp_sequence_sharding=true"], "train.eval_tasks"),
])
def test_eval_task_settings_are_validated_naming_the_key(overrides, key):
    from titans_train.config import ConfigError, load_recipe

    with pytest.raises(ConfigError) as caught:
        load_recipe("debug", overrides, world_size=2)
    assert caught.value.key == key
