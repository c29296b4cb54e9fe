"""The Hugging Face model: for every variant its logits equal TitansLM's, cached `generate()`
equals recomputing the whole sequence each step, left-padded batches equal each sequence alone,
and it loads with the Auto classes without DeepSpeed or megatron-core.

Models are the debug recipe's shape (chunk 8, MAC segment 16, window 16) with random weights,
exported once per variant through `export_hf`; prompts and continuations cross several chunk,
segment and window boundaries.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from titans_train.model import VARIANTS

NEW_TOKENS = 26  # from prompts of 5-13 tokens: crosses positions 8, 16, 24, 32


def _export(variant: str, out: Path):
    from titans_train.config import load_recipe, model_config, to_container
    from titans_train.convert.consolidate import ConsolidatedModel
    from titans_train.convert.hf_export import export_hf
    from titans_train.model import TitansLM

    recipe = load_recipe("debug", [f"model.variant={variant}"])
    run = to_container(recipe)
    torch.manual_seed(VARIANTS.index(variant))
    model = TitansLM(model_config(recipe)).eval()
    with torch.no_grad():  # larger memory gates than at init, so the memory visibly matters
        for name, parameter in model.named_parameters():
            if name.endswith(("theta_proj.bias", "alpha_proj.bias")):
                parameter.fill_(1.0)
    state = {name: value for name, value in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_embeddings)}
    consolidated = ConsolidatedModel(out.parent / "nowhere", {"step": 0, "config": run}, state)
    export_hf(consolidated, out)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    models = {}
    for variant in VARIANTS:
        ours = _export(variant, root / variant)
        hf = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=True).eval()
        models[variant] = (ours, hf, root / variant)
    return models


def _random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_the_training_model(exported, variant):
    ours, hf, _ = exported[variant]
    ids = _random_ids(2, 45, 1)
    with torch.no_grad():
        expected = ours(ids).logits
        actual = hf(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _greedy_by_recomputing(hf, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Tokens and per-step logits (steps, V), reading the whole sequence again at every step."""
    ids, all_logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(ids, use_cache=False).logits[:, -1]
            all_logits.append(logits[0])
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist(), torch.stack(all_logits)


def _generate(hf, ids, mask) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens per row and logits (B, steps, V)."""
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                      pad_token_id=256, output_logits=True, return_dict_in_generate=True)
    return [row[ids.shape[1]:].tolist() for row in out.sequences], torch.stack(out.logits, dim=1)


def _assert_logits_close(actual, expected):
    # Logits move by ~1e-3 .. 1e-1 when a pad token is read or a state step is lost (checked).
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generate_equals_recomputing_and_left_padding_equals_each_sequence(exported, variant):
    _, hf, _ = exported[variant]
    prompts = [_random_ids(1, length, seed)[0] for length, seed in ((13, 2), (5, 3), (13, 4), (9, 5))]
    alone, alone_logits = [], []
    for prompt in prompts:
        tokens, logits = _generate(hf, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        alone.append(tokens[0])
        alone_logits.append(logits[0])
    for row in (0, 1):
        tokens, logits = _greedy_by_recomputing(hf, prompts[row][None], NEW_TOKENS)
        assert alone[row] == tokens
        _assert_logits_close(alone_logits[row], logits)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 256)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    tokens, logits = _generate(hf, ids, mask)
    assert tokens == alone
    _assert_logits_close(logits, torch.stack(alone_logits))


def test_right_padding_is_refused(exported):
    _, hf, _ = exported["mac"]
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        hf(_random_ids(2, 6, 0), attention_mask=mask)


def test_auto_classes_load_without_deepspeed_or_megatron(exported):
    directory = exported["mag"][2]
    script = textwrap.dedent(f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(directory)!r})
        ids = tokenizer(["héllo", "a"], return_tensors="pt", padding=True)
        assert ids["input_ids"][0].tolist() == list("héllo".encode()), ids
        assert tokenizer.decode(list("héllo".encode()) + [256]) == "héllo<|endoftext|>"
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        heavy = sorted({{name.split(".")[0] for name in sys.modules if name.split(".")[0] in ("deepspeed", "megatron")}})
        print(type(model).__name__, out.shape[1], heavy)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "TitansForCausalLM 9 []"


def test_beam_search_with_the_cache_equals_beam_search_recomputing(exported):
    # beam search reorders the cache's rows (`reorder_cache`) after every step
    _, hf, _ = exported["mal"]
    ids = _random_ids(2, 9, 6)
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3, do_sample=False,
                  eos_token_id=None, pad_token_id=256, output_scores=True, return_dict_in_generate=True)
    cached = hf.generate(ids, use_cache=True, **common)
    recomputed = hf.generate(ids, use_cache=False, **common)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=1e-5, atol=1e-6)


def test_the_hf_model_imports_from_the_checkout_root():
    # From the root, `python -c` puts the checkout on sys.path, where its kernels/ folder would
    # shadow the Hugging Face `kernels` package that transformers imports.
    checkout_root = Path(__file__).resolve().parents[1]
    script = textwrap.dedent("""
        import sys
        import titans_train.hf
        from transformers import PreTrainedModel
        print(getattr(sys.modules.get("kernels"), "__file__", None))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=checkout_root, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not result.stdout.strip().startswith(str(checkout_root / "kernels")), result.stdout
