"""`titans-train reproduce` end to end on a tiny budget: corpus, a trained variant (MAC, whose memory
telemetry the table reports), its evaluation, the table, JSON and heatmaps. One run: every run is a
training and an eval process (~10 s each on a quiet core)."""

import json

import pytest
import yaml

from titans_train.cli import main

TINY_STUDY = {
    "name": "niah-tiny",
    "recipe": "evals/niah-cpu",
    "overrides": {"train.micro_batch_size": 4, "train.global_batch_tokens": 1024, "train.eval_interval": 1,
                  "logging.telemetry_interval": 1, "logging.interval": 1, "checkpoint.interval": 2, "train.warmup_steps": 1},
    "axes": {"sizes": [{"name": "d16", "dim": 16, "n_layers": 1, "n_heads": 2}], "tokens": [2048],
             "variants": [{"name": "mac", "overrides": {"model.variant": "mac"}}]},
}


def test_reproduce_trains_evaluates_and_tabulates(tmp_path, capsys):
    study = tmp_path / "niah-tiny.yaml"
    study.write_text(yaml.safe_dump(TINY_STUDY))
    runs = tmp_path / "runs"
    assert main(["reproduce", str(study), "--runs-dir", str(runs), "--corpus", str(tmp_path / "corpus"),
                 "--validation-documents", "8", "--lengths", "1x,2x", "--haystacks", "repeat",
                 "--samples", "1"]) == 0
    summary = json.loads((runs / "reproduction.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["mac-d16-t2.048k"]
    for run in summary["runs"]:
        assert run["status"] == "finished" and run["steps"] == 2 and run["tokens"] == 2048
        assert {task: [step for step, _ in curve] for task, curve in run["curves"].items()} == {
            "niah": [0, 1, 2], "mqar": [0, 1, 2]}
        assert set(run["first_retrieval_step"]) == {"niah", "mqar"}
        assert set(run["niah"]["repeat"]) == set(run["mqar"]) == {"256", "512"}
        assert all(0.0 <= a <= 1.0 for a in [*run["niah"]["repeat"].values(), *run["mqar"].values()])
        assert [b["start"] for b in run["ppl"]["by_length"][-1]["buckets"]][:2] == [0, 128]
        assert (runs / run["run"] / "eval-repeat.json").is_file()
        assert (runs / run["run"] / "eval-repeat.niah.png").is_file()
    assert {"theta", "eta", "alpha", "update_norm"} <= {k.rsplit("/", 1)[1] for k in summary["runs"][0]["telemetry"]}
    losses = summary["runs"][0]["answer_loss"]  # the validation documents' answers, by kind
    assert set(losses) <= {"niah", "copy", "mqar0", "mqar1", "mqar2"} and len(losses) >= 2
    assert all(0 < kind["loss"] < 10 and kind["tokens"] >= kind["answers"] > 0 for kind in losses.values())
    assert all(0 <= kind["exact"] <= 1 for kind in losses.values())
    assert (runs / "reproduction-repeat.png").is_file()
    table = (runs / "reproduction.md").read_text()
    assert "| mac-d16-t2.048k | " in table and "| first niah | first mqar |" in table and "| mqar 512 |" in table
    assert table in capsys.readouterr().out
    corpus = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert corpus["train_documents"] == 8  # 2048 tokens / 256 per document: every sample seen once


def test_reproduce_refuses_an_unknown_haystack_before_any_work(tmp_path, capsys):
    assert main(["reproduce", "--haystacks", "repeat,rep", "--corpus", str(tmp_path / "corpus")]) == 2
    assert "--haystacks: rep given; choose from repeat, natural" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


def test_reproduce_refuses_a_tokenizer_other_than_bytes_before_any_work(tmp_path, capsys):
    study = tmp_path / "niah-tiny.yaml"
    study.write_text(yaml.safe_dump({**TINY_STUDY, "overrides": {
        **TINY_STUDY["overrides"], "data.tokenizer": str(tmp_path / "tokenizer.json")}}))
    assert main(["reproduce", str(study), "--runs-dir", str(tmp_path / "runs"),
                 "--corpus", str(tmp_path / "corpus")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("config error: data.tokenizer: "), error
    assert f"{tmp_path / 'tokenizer.json'} in run mac-d16-t2.048k of {study}" in error
    assert "byte-level by construction" in error and "(or set it to byte)" in error
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "runs").exists()


def test_answer_scores_sum_the_answer_tokens_loss_and_greedy_hits():
    import math

    import torch

    from titans_train.eval.reproduction import answer_scores

    ids = [0, 1, 2, 1]
    probabilities = torch.tensor([[0.1, 0.7, 0.2],   # predicts ids[1] = 1: the greedy choice
                                  [0.5, 0.1, 0.4],   # predicts ids[2] = 2: greedy would say 0
                                  [0.2, 0.6, 0.2],   # predicts ids[3] = 1: the greedy choice
                                  [1 / 3, 1 / 3, 1 / 3]])
    loss, right = answer_scores(probabilities.log(), ids, offset=1, length=3)
    assert loss == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.6)))
    assert right == 2
    assert answer_scores(probabilities.log(), ids, offset=3, length=1) == (pytest.approx(-math.log(0.6)), 1)
