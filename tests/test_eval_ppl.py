"""`eval ppl`: the whole held-out split, streamed through the state contract, on any layout.

Proven here: the perplexity at the training length equals a direct computation (every prepared
sample through one plain forward); streaming a window of 4x the training length in segments with
the state carried equals the whole-window forward; 2 processes (dp 2, and tp 2) give the numbers
of 1 (and the same greedy answers to retrieval probes); a converted HF directory evaluates to the
numbers of its source checkpoint; bad input is one line naming the option.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from eval_fixtures import SEQ_LEN, build_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_sources(tmp_path_factory.mktemp("eval"))


def _world_of_one():
    from titans_train.eval.distributed import EvalLayout
    from titans_train.parallel import ParallelContext

    return EvalLayout.from_context(ParallelContext.initialize())


def _parsed(argv: list[str]):
    import argparse

    from titans_train.eval.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def evaluate_layouts(source: str, data: str, tps: list[int]) -> dict:
    """`eval` results (ppl + niah) and the greedy answers to an mqar probe, for each tp size."""
    from titans_train.eval.cli import evaluate
    from titans_train.eval.distributed import EvalLayout, FullLogits
    from titans_train.eval.mqar import mqar_probes
    from titans_train.eval.probes import greedy_answerer
    from titans_train.eval.source import load_source
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.parallelize import parallelize

    out = {}
    for tp in tps:
        results, _ = evaluate(_parsed([source, "--tasks", "ppl,niah", "--lengths", "4x", "--samples", "1",
                                       "--depths", "0,1", "--haystack", "repeat", "--batch-size", "4",
                                       "--data", data, "--tp", str(tp)]))
        loaded = load_source(source)
        context = ParallelContext.initialize(tp=tp)
        parallelize(loaded.model, None, context)
        answer = greedy_answerer(FullLogits(loaded.model, context), SEQ_LEN)
        (probe,) = mqar_probes(loaded.tokenizer, [96], seed=1, samples=1)
        out[tp] = {"results": results, "answers": answer(probe, loaded.tokenizer), "layout": results["layout"]}
    return out


def test_perplexity_at_the_training_length_is_the_direct_mean_over_every_sample(sources):
    from titans_train.data import PreparedDataset
    from titans_train.eval.ppl import held_out_stream, perplexity
    from titans_train.eval.source import load_source

    loaded = load_source(sources.checkpoint)
    dataset = PreparedDataset(sources.data)
    _, samples = dataset.read(np.arange(len(dataset)))
    tokens = torch.from_numpy(samples.astype(np.int64))
    with torch.no_grad():
        logits = loaded.model(tokens[:, :-1]).logits
    direct = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="mean").item()
    result = perplexity(loaded.model, held_out_stream(sources.data), SEQ_LEN, _world_of_one(), SEQ_LEN, 5)
    assert result.windows == len(dataset) and result.tokens == len(dataset) * SEQ_LEN
    assert result.loss == pytest.approx(direct, rel=1e-6)


def test_streaming_four_times_the_training_length_equals_the_whole_window_forward(sources):
    from titans_train.eval.ppl import held_out_stream, streamed_token_losses, windows
    from titans_train.eval.source import load_source
    from titans_train.parallel.tensor_parallel import token_losses

    loaded = load_source(sources.checkpoint)
    batch = torch.from_numpy(windows(held_out_stream(sources.data), 4 * SEQ_LEN)[:3].astype(np.int64))
    streamed = streamed_token_losses(loaded.model, batch, SEQ_LEN, _world_of_one().context)
    with torch.no_grad():
        whole = token_losses(loaded.model(batch[:, :-1]).logits, batch[:, 1:])
    assert streamed.shape == (3, 4 * SEQ_LEN)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
    # The memory carries information across segments: a fresh state per segment loses it.
    fresh = torch.cat([streamed_token_losses(loaded.model, batch[:, s:s + SEQ_LEN + 1], SEQ_LEN, _world_of_one().context)
                       for s in range(0, 4 * SEQ_LEN, SEQ_LEN)], dim=1)
    assert not torch.allclose(fresh[:, SEQ_LEN:], whole[:, SEQ_LEN:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant", ["lmm", "mag", "mal", "swa", "transformer"])
def test_streaming_equals_the_whole_forward_for_every_other_variant(sources, variant):
    from titans_train.config import load_recipe, model_config
    from titans_train.eval.ppl import held_out_stream, streamed_token_losses, windows
    from titans_train.model import TitansLM
    from titans_train.parallel.tensor_parallel import token_losses

    torch.manual_seed(1)
    model = TitansLM(model_config(load_recipe("debug", [f"model.variant={variant}"]))).eval()
    batch = torch.from_numpy(windows(held_out_stream(sources.data), 4 * SEQ_LEN)[:2].astype(np.int64))
    streamed = streamed_token_losses(model, batch, SEQ_LEN, _world_of_one().context)
    with torch.no_grad():
        whole = token_losses(model(batch[:, :-1]).logits, batch[:, 1:])
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


def _assert_same_results(actual: dict, expected: dict, label: str) -> None:
    assert actual["niah"] == expected["niah"], label
    for a, e in zip(actual["ppl"]["by_length"], expected["ppl"]["by_length"], strict=True):
        assert (a["length"], a["windows"]) == (e["length"], e["windows"]), label
        assert a["loss"] == pytest.approx(e["loss"], rel=1e-5), (label, a["length"])
        for bucket_a, bucket_e in zip(a["buckets"], e["buckets"], strict=True):
            assert bucket_a["loss"] == pytest.approx(bucket_e["loss"], rel=1e-5), (label, a["length"], bucket_a)


def test_two_processes_dp_and_tp_give_the_numbers_of_one(sources):
    (one,) = evaluate_layouts(sources.checkpoint, sources.data, [1]).values()
    two = run_distributed("test_eval_ppl:evaluate_layouts", 2, 300, source=sources.checkpoint, data=sources.data,
                          tps=[1, 2])
    assert one["results"]["tasks"]["ppl"]["by_length"][-1]["windows"] > 2  # several windows to split
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # --device auto: the rank's device
    assert one["layout"] == {"tp": 1, "replicas": 1, "device": device}
    assert [two[0][tp]["layout"] for tp in (1, 2)] == [{"tp": 1, "replicas": 2, "device": device},
                                                       {"tp": 2, "replicas": 1, "device": device}]
    for rank in (0, 1):
        for tp, label in ((1, "dp 2"), (2, "tp 2")):
            _assert_same_results(two[rank][tp]["results"]["tasks"], one["results"]["tasks"], f"{label}, rank {rank}")
            assert two[rank][tp]["answers"] == one["answers"], (label, rank)


def _eval_json(capsys, *argv) -> dict:
    from titans_train.cli import main

    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_converted_hf_directory_evaluates_to_the_numbers_of_its_checkpoint(sources, capsys, tmp_path):
    argv = ["--tasks", "ppl,mqar", "--lengths", "1x,2x", "--samples", "2", "--data", sources.data]
    from_run = _eval_json(capsys, sources.run_dir, *argv, "--out", str(tmp_path / "run.json"))
    from_hf = _eval_json(capsys, sources.hf, *argv)
    assert from_run["step"] == from_hf["step"] == 7
    assert from_run["source"] == sources.checkpoint and from_hf["source"] == sources.hf
    assert from_hf["tasks"]["mqar"] == from_run["tasks"]["mqar"]
    for a, e in zip(from_hf["tasks"]["ppl"]["by_length"], from_run["tasks"]["ppl"]["by_length"], strict=True):
        assert a["loss"] == pytest.approx(e["loss"], rel=1e-6)
    assert json.loads((tmp_path / "run.json").read_text()) == from_run


@pytest.mark.parametrize("argv, option", [
    (["--tasks", "ppl,nia"], "--tasks"),
    (["--tasks", "niah", "--lengths", "40"], "--lengths"),
    (["--tasks", "niah", "--lengths", "4y"], "--lengths"),
    (["--tasks", "niah", "--needle", "passkee"], "--needle"),
    (["--tasks", "ppl", "--tp", "3"], "--tp"),
])
def test_bad_options_are_one_line_naming_the_option(sources, capsys, argv, option):
    from titans_train.cli import main

    assert main(["eval", sources.checkpoint, *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"error: {option}:"), error


@pytest.mark.parametrize("device, cuda, problem", [
    ("gpu", False, "'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("meta", False, "'meta': evaluation runs on cpu or cuda; use auto, cpu, cuda or cuda:N"),
    ("cuda", False, "'cuda' but this machine has no CUDA device; use auto or cpu"),
    ("cuda:1", True, "'cuda:1' but this machine has 1 CUDA device(s); use auto or cuda:0 to cuda:0"),
])
def test_a_bad_device_is_refused_before_the_source_is_read(capsys, monkeypatch, tmp_path, device, cuda, problem):
    from titans_train.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    # SOURCE does not exist: the error names --device, so the device was checked first.
    assert main(["eval", str(tmp_path / "missing"), "--device", device]) == 2
    assert capsys.readouterr().err.strip() == f"error: --device: {problem}"


def test_a_source_that_is_not_a_model_is_one_line_naming_it(sources, capsys, tmp_path):
    from titans_train.cli import main

    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "missing", tmp_path / "empty", sources.data):
        assert main(["eval", str(source), "--tasks", "ppl"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and error.startswith(f"error: SOURCE {source}:"), error


def test_the_command_prints_a_table_and_writes_json_heatmaps_and_the_probes(sources, capsys, tmp_path):
    from titans_train.cli import main

    out = tmp_path / "results" / "eval.json"
    assert main(["eval", sources.checkpoint, "--tasks", "niah,babilong", "--lengths", "300", "--samples", "1",
                 "--depths", "0,0.5,1", "--haystack", "repeat", "--out", str(out),
                 "--write-data", str(tmp_path / "probes")]) == 0
    printed = capsys.readouterr().out
    assert "niah: accuracy" in printed and "length=300 depth=0.5" in printed and "length=300 qa=qa2" in printed
    results = json.loads(out.read_text())
    assert [(c["length"], c["depth"]) for c in results["tasks"]["niah"]["cells"]] == [(300, 0.0), (300, 0.5), (300, 1.0)]
    for task in ("niah", "babilong"):
        assert (tmp_path / "results" / f"eval.{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        probes = [json.loads(line) for line in (tmp_path / "probes" / f"{task}.jsonl").read_text().splitlines()]
        assert len(probes) == results["tasks"][task]["probes"]
        for probe in probes:
            for needle in probe["needles"]:
                assert needle["text"] in probe["context"]
