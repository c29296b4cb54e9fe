"""`titans-train generate`: a checkpoint's model continues a prompt with its state carried."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed


def train_rank(run_dir: str, zero_stage: int) -> str:
    from titans_train.config import load_recipe
    from titans_train.train.trainer import train

    config = load_recipe("debug", [f"run_dir={run_dir}", "train.steps=4", f"parallel.zero_stage={zero_stage}"],
                         world_size=None)
    return train(config).checkpoint


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    runs = {}
    # ZeRO 0 keeps whole weights in one file; ZeRO >= 1 goes through zero_to_fp32, and ZeRO-3's
    # run was also built partitioned (parallel/construction.py)
    for stage in (0, 3):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}")
        (checkpoint,) = run_distributed("test_generate:train_rank", 1, 240, init_process_group=False,
                                        run_dir=str(run_dir), zero_stage=stage)
        runs[stage] = (run_dir, Path(checkpoint))
    return runs


def test_both_checkpoint_kinds_load_the_same_trained_weights(trained_runs):
    from titans_train.generate import load_for_inference

    model0, _, _, _ = load_for_inference(trained_runs[0][0])
    model3, _, _, _ = load_for_inference(trained_runs[3][1])
    fresh = load_for_inference(trained_runs[0][1])[0]
    for (name, a), (_, b) in zip(model0.state_dict().items(), model3.state_dict().items()):
        # Same data, same seed, same fp32 arithmetic: the stages train identical weights.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    from titans_train.config import load_recipe, model_config
    from titans_train.model import TitansLM

    torch.manual_seed(0)
    untrained = TitansLM(model_config(load_recipe("debug")))
    assert not torch.equal(untrained.embedding.weight, fresh.embedding.weight)


def test_carried_state_generation_matches_rereading_the_whole_text(trained_runs):
    from titans_train.generate import generate, load_for_inference

    model, tokenizer, _, _ = load_for_inference(trained_runs[0][0])
    prompt = tokenizer.encode("def main(argv):\n    return ")
    generated = generate(model, prompt, max_new_tokens=40, temperature=0.0, top_k=0)
    assert len(generated) == 40
    with torch.no_grad():  # greedy: each token is the argmax after reading everything before it
        logits = model(torch.tensor([prompt + generated])).logits[0]
    expected = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
    assert generated == expected


def test_sampling_is_seeded(trained_runs):
    from titans_train.generate import generate, load_for_inference

    model, tokenizer, _, _ = load_for_inference(trained_runs[0][0])
    prompt = tokenizer.encode("import ")
    first = generate(model, prompt, 30, temperature=1.0, top_k=20, seed=3)
    assert first == generate(model, prompt, 30, temperature=1.0, top_k=20, seed=3)
    assert first != generate(model, prompt, 30, temperature=1.0, top_k=20, seed=4)


def test_generate_cli(trained_runs, capsys):
    from titans_train.cli import main

    # A new process, as a user's: its stdout is the text alone (deepspeed, imported for the ZeRO
    # checkpoint there for the first time, once printed its accelerator warning into it).
    done = subprocess.run([sys.executable, "-m", "titans_train", "generate", "--checkpoint", str(trained_runs[3][0]),
                           "--prompt", "class ", "--max-new-tokens", "20", "--seed", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    from titans_train.generate import generate, load_for_inference

    model, tokenizer, _, _ = load_for_inference(trained_runs[3][0])
    continuation = generate(model, tokenizer.encode("class "), 20, temperature=0.8, top_k=50, seed=1,
                            stop_id=tokenizer.eos_id)
    assert continuation  # the model wrote something: an echo of the prompt cannot pass
    assert done.stdout == "class " + tokenizer.decode(continuation) + "\n"
    assert main(["generate", "--checkpoint", str(trained_runs[3][0] / "nowhere"), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
