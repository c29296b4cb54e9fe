"""In-training validation is over a fixed set of samples, so 1 and 2 processes report the same loss.

The set is the first eval_batches x micro_batch_size validation samples whatever the layout;
eval_batches=3 with 2 data-parallel ranks leaves each rank a padded last round (weight 0), and
ZeRO-3 needs every rank's forward passes in lockstep. (Before, each rank averaged eval_batches
micro-batches of its own, so 2 ranks validated on twice as many samples as 1.)
"""

from __future__ import annotations

from pathlib import Path

from distributed import run_distributed

COMMON = ["train.steps=1", "train.eval_batches=3", "checkpoint.save_final=false"]
LAYOUTS = {"dp2-zero3": ["parallel.zero_stage=3"], "tp2": ["parallel.tp=2", "parallel.zero_stage=1"]}


def validation_rank(root: str, layouts: dict[str, list[str]]) -> dict[str, dict[int, float]]:
    from titans_train.config import load_recipe
    from titans_train.train.trainer import train

    out = {}
    for name, overrides in layouts.items():
        config = load_recipe("debug", [f"run_dir={Path(root) / name}", *COMMON, *overrides], world_size=None)
        out[name] = train(config).validation
    return out


def test_validation_loss_is_the_same_on_one_and_two_processes(tmp_path):
    (one,) = run_distributed("test_eval_validation:validation_rank", 1, 240, init_process_group=False,
                             root=str(tmp_path / "one"), layouts={"one": ["parallel.zero_stage=0"]})
    two = run_distributed("test_eval_validation:validation_rank", 2, 300, init_process_group=False,
                          root=str(tmp_path / "two"), layouts=LAYOUTS)
    reference = one["one"]
    assert sorted(reference) == [0, 1]
    for name in LAYOUTS:
        assert two[0][name] == two[1][name], name  # every rank reports the global number
        for step, loss in reference.items():
            assert abs(two[0][name][step] - loss) <= 1e-5 * loss, (name, step, two[0][name][step], loss)
