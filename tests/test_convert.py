"""Checkpoint conversion: every layout consolidates to the live weights; HF export, round trip,
`train.init_from` on another layout, `titans-train generate` agreement, and bad input.

Checkpoints are written once per module (debug MAC model, 2 steps): ZeRO 0 on 1 rank, then on
2 ranks ZeRO-3 dp=2, ZeRO-2 bf16 dp=2, tp=2 (ZeRO 1), sp=2 (ZeRO 3, only sp rank 0 writes ZeRO
files) and a tp=2 run started with `train.init_from` the ZeRO-0 checkpoint. Each run records the
full live parameters at its last step (gathered over ZeRO-3 / tp) to compare with. Resuming on
another layout (resharding) is tested in tests/test_reshard.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

STEPS = 2
LAYOUTS_ON_TWO = {  # dp layouts first: DeepSpeed keeps a process-global mpu between runs
    "dp2-zero3": ["parallel.zero_stage=3"],
    "dp2-zero2-bf16": ["parallel.zero_stage=2", "train.precision=bf16"],
    "tp2-zero1": ["parallel.tp=2", "parallel.zero_stage=1"],
    "sp2-zero3": ["parallel.sp=2", "parallel.zero_stage=3"],
}


def _live_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter at full shape, as the engine holds it now (ZeRO-3 gathered, tp unsharded)."""
    from titans_train.parallel.tensor_parallel import gather_full_parameters

    model = trainer.engine.module.model
    if trainer.config.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().clone() for name, p in model.named_parameters()}
    if trainer.context.tp_size > 1:
        return gather_full_parameters(model, trainer.context)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_layouts(root: str, layouts: dict[str, list[str]]) -> dict:
    from titans_train.config import load_recipe
    from titans_train.train.callbacks import Callback
    from titans_train.train.trainer import train

    class CaptureLive(Callback):
        def on_step_end(self, trainer, metrics):
            if metrics.step == STEPS:
                live.update(_live_parameters(trainer))

    root = Path(root)
    out = {}
    for name, overrides in layouts.items():
        live = {}

        config = load_recipe("debug", [f"run_dir={root / name}",
                                       f"train.steps={STEPS}", "train.warmup_steps=1", *overrides], world_size=None)
        result = train(config, callbacks=[CaptureLive()])
        # as numpy (exact for bf16 too): tensors would cross the process boundary as shared memory
        live = {key: (value.float().numpy(), str(value.dtype).removeprefix("torch.")) for key, value in live.items()}
        out[name] = {"checkpoint": result.checkpoint, "live": live, "validation": result.validation,
                     "losses": [result.losses[step] for step in sorted(result.losses)]}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    (one,) = run_distributed("test_convert:train_layouts", 1, 240, init_process_group=False, root=str(root),
                             layouts={"zero0": ["parallel.zero_stage=0"]})
    layouts = dict(LAYOUTS_ON_TWO)
    layouts["init-tp2"] = ["parallel.tp=2", "parallel.zero_stage=1", f"train.init_from={root / 'zero0'}"]
    two = run_distributed("test_convert:train_layouts", 2, 480, init_process_group=False, root=str(root),
                          layouts=layouts)
    return {"root": root, **one, **two[0]}


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["zero0", *LAYOUTS_ON_TWO])
def test_every_layout_consolidates_to_the_live_parameters(runs, layout):
    from titans_train.convert.consolidate import consolidate

    run = runs[layout]
    source = Path(run["checkpoint"])
    before = _tree_digest(source)
    live = {name.removeprefix("model."): torch.from_numpy(array).to(getattr(torch, dtype))
            for name, (array, dtype) in run["live"].items()}
    assert set(live) - {"lm_head.weight"} == set(consolidate(source).state)
    if layout.endswith("bf16"):  # the module ran in bf16 copies of the fp32 master weights
        state = consolidate(source, dtype="bf16").state
        fp32 = consolidate(source, dtype="fp32").state
        for name, value in state.items():
            assert live[name].dtype == torch.bfloat16
            assert torch.equal(value, live[name]), name
        # and the fp32 weights are the optimizer's master copy, not the bf16 module upcast
        assert any(not torch.equal(fp32[name], state[name].float()) for name in fp32)
    else:
        for name, value in consolidate(source).state.items():
            assert torch.equal(value, live[name].float()), name
    assert _tree_digest(source) == before  # nothing written into the source


def test_tensor_parallel_shards_are_the_plan_split_of_the_full_weights(runs):
    from titans_train.convert.consolidate import consolidate, read_tp_rank_weights
    from titans_train.convert.tp_layout import is_weight_entry, merge_tensor_parallel, shard_for_rank

    consolidated = consolidate(runs["tp2-zero1"]["checkpoint"])
    for rank in range(2):
        stored = read_tp_rank_weights(consolidated.checkpoint, consolidated.manifest, rank)
        cut = shard_for_rank(consolidated.state, 264, 2, rank)
        assert set(cut) == {name for name in stored if is_weight_entry(name)} - {"lm_head.weight"}
        for name, value in cut.items():
            assert torch.equal(value, stored[name]), (rank, name)
    # vocabulary padding: 5 rows over tp 2 -> 3 + 3 rows (one zero row), merged back to 5
    full = {"embedding.weight": torch.randn(5, 4), "layers.0.mlp.down_proj.weight": torch.randn(4, 6)}
    shards = [shard_for_rank(full, 5, 2, rank) for rank in range(2)]
    assert shards[1]["embedding.weight"].shape == (3, 4) and not shards[1]["embedding.weight"][-1].any()
    assert shards[0]["layers.0.mlp.down_proj.weight"].shape == (4, 3)  # row-parallel: input dim split
    merged = merge_tensor_parallel(shards, 5)
    assert all(torch.equal(merged[name], full[name]) for name in full)


def test_init_from_starts_another_layout_at_the_source_models_loss(runs):
    source_loss = runs["zero0"]["validation"][STEPS]  # the saved weights' validation loss
    started = runs["init-tp2"]["validation"][0]  # tp = 2, step 0, initialised from that checkpoint
    assert abs(started - source_loss) <= 1e-5 * abs(source_loss), (started, source_loss)


def test_hf_round_trip_and_generate_agree_with_titans_train_generate(runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from titans_train.cli import main
    from titans_train.convert.consolidate import consolidate
    from titans_train.generate import generate, load_for_inference

    source = runs["tp2-zero1"]["checkpoint"]
    first, back, second = tmp_path / "hf", tmp_path / "checkpoint", tmp_path / "hf2"
    assert main(["convert", source, str(first), "--to", "hf"]) == 0
    assert main(["convert", str(first), str(back), "--to", "checkpoint"]) == 0
    assert main(["convert", str(back), str(second), "--to", "hf"]) == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    original, returned = consolidate(source).state, consolidate(back).state
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "modeling_titans.py"} <= {p.name for p in first.iterdir()}

    model = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(first)
    ours, our_tokenizer, _, _ = load_for_inference(source)
    prompt = "def main(argv):\n    "
    assert tokenizer(prompt)["input_ids"] == our_tokenizer.encode(prompt)
    expected = generate(ours, our_tokenizer.encode(prompt), max_new_tokens=30, temperature=0.0, top_k=0)
    ids = tokenizer([prompt], return_tensors="pt")
    produced = model.generate(**ids, max_new_tokens=30, do_sample=False, eos_token_id=None)[0, ids["input_ids"].shape[1]:]
    assert produced.tolist() == expected


def test_shards_past_the_size_limit_load_the_same_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from titans_train.cli import main

    out = tmp_path / "sharded"
    assert main(["convert", runs["zero0"]["checkpoint"], str(out), "--to", "hf", "--max-shard-size", "60KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    from titans_train.convert.consolidate import consolidate

    for name, value in consolidate(runs["zero0"]["checkpoint"]).state.items():
        assert torch.equal(model.model.state_dict()[name], value), name


def _error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_bad_input_is_one_line_naming_the_path_and_the_fix(runs, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from titans_train.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(Path(runs["dp2-zero3"]["checkpoint"]).parents[1], run_dir)
    tag = run_dir / "checkpoints" / "step000000002"
    cases = {}
    # a save cut short: no manifest
    partial = run_dir / "checkpoints" / ".partial-step000000004"
    shutil.copytree(tag, partial)
    (partial / "titans_checkpoint.json").unlink()
    cases["partial"] = (partial, ".partial-step000000004")
    # a truncated shard (the manifest's size check) and a same-size damaged shard (its digest)
    truncated = tmp_path / "truncated" / "step000000002"
    shutil.copytree(tag, truncated)
    shard = truncated / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    cases["truncated"] = (truncated, "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes")
    scrambled = tmp_path / "scrambled" / "step000000002"
    shutil.copytree(tag, scrambled)
    shard = scrambled / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(shard.stat().st_size))
    cases["scrambled"] = (scrambled, "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its xxh3_128 digest")
    not_checkpoint = tmp_path / "empty"
    not_checkpoint.mkdir()
    cases["not a checkpoint"] = (not_checkpoint, "is not a training checkpoint")
    digests = {name: _tree_digest(path) for name, (path, _) in cases.items()}
    for name, (path, expected) in cases.items():
        assert main(["convert", str(path), str(tmp_path / f"out-{len(name)}"), "--to", "hf"]) == 2, name
        line = _error_line(capsys)
        assert expected in line and "Fix:" in line, (name, line)
        assert _tree_digest(path) == digests[name], name  # the source is never modified
        assert not (tmp_path / f"out-{len(name)}").exists(), name

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["convert", str(run_dir), str(existing), "--to", "hf"]) == 2
    line = _error_line(capsys)
    assert str(existing) in line and "--overwrite" in line, line
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert main(["convert", str(run_dir), str(existing), "--to", "hf", "--overwrite"]) == 0
    assert (existing / "config.json").is_file() and not (existing / "keep.txt").exists()
    capsys.readouterr()

    big = tmp_path / "big-tokenizer.json"  # 300 ids for a 264-token vocabulary
    vocab = {f"t{i}": i for i in range(299)} | {"<|endoftext|>": 299}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(big))
    assert main(["convert", str(run_dir), str(tmp_path / "out-tok"), "--to", "hf", "--tokenizer", str(big)]) == 2
    line = _error_line(capsys)
    assert str(big) in line and "300 ids" in line and "Fix:" in line, line
    assert json.loads((tag / "titans_checkpoint.json").read_text())["step"] == STEPS
