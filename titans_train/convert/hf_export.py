"""A consolidated model as a Hugging Face directory, and such a directory read back.

OUT holds:
  config.json                    `TitansHFConfig`: the `TitansConfig` under `titans`, the training
                                 run's resolved config under `titans_run`, `auto_map` to the files below
  model.safetensors              the weights (TitansForCausalLM names, `model.` + TitansLM path);
                                 past `max_shard_size` model-0000i-of-0000n.safetensors + an index
  configuration_titans.py,       two-line shims importing `titans_train.hf`, for
  modeling_titans.py             `trust_remote_code=True` (the model code itself is not copied)
  tokenizer.json, tokenizer_config.json   a `PreTrainedTokenizerFast` (the byte tokenizer is
                                 expressed as a byte-level BPE with no merges: ids 0-255 = bytes)
  generation_config.json         eos/pad ids
  README.md                      a model card: what the model is and how it was trained
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from titans_train.convert.consolidate import DTYPES, TRAINER_PREFIX, ConsolidatedModel
from titans_train.convert.errors import ConversionError
from titans_train.convert.output import atomic_directory

HF_PREFIX = "model."  # TitansForCausalLM.model is the TitansLM
REMOTE_CODE = {
    "configuration_titans.py": "from titans_train.hf.configuration_titans import TitansHFConfig  # noqa: F401\n",
    "modeling_titans.py": "from titans_train.hf.modeling_titans import TitansForCausalLM  # noqa: F401\n",
}
AUTO_MAP = {"AutoConfig": "configuration_titans.TitansHFConfig",
            "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM"}
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SHARD_SIZE = "5GB"


def byte_tokenizer_object():
    """The built-in byte tokenizer (bytes = ids 0-255, EOS = 256) as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={characters[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tokenizer


def hf_tokenizer(spec: str, vocab_size: int):
    """A `PreTrainedTokenizerFast` for the run's tokenizer spec ("byte" or a tokenizers JSON path),
    padding on the left with EOS (what batched `generate` needs). Refuses one with more ids than
    the model's vocabulary."""
    from transformers import PreTrainedTokenizerFast

    from titans_train.data import load_tokenizer
    from titans_train.data.errors import TokenizerError

    try:
        ours = load_tokenizer(spec)
    except TokenizerError as error:
        raise ConversionError(spec, str(error).split(";")[0], "pass --tokenizer PATH (the run's tokenizer.json)") from None
    if ours.vocab_size > vocab_size:
        raise ConversionError(spec, f"the tokenizer has {ours.vocab_size} ids, the model's vocabulary only "
                              f"{vocab_size}", "pass --tokenizer with the tokenizer the model was trained with")
    if spec == "byte":
        backend = byte_tokenizer_object()
        eos = EOS_TOKEN
    else:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(spec))
        eos = backend.id_to_token(ours.eos_id)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                        padding_side="left", clean_up_tokenization_spaces=False)
    return tokenizer, ours.eos_id


def _model_card(consolidated: ConsolidatedModel, dtype: str) -> str:
    run, manifest = consolidated.run_config, consolidated.manifest
    model = run["model"]
    parallel, train = run["parallel"], run["train"]
    parameters = sum(t.numel() for t in consolidated.state.values())
    return f"""---
library_name: transformers
tags: [titans, titans-train, neural-memory]
---
# {run.get("name", "titans")} ({model["variant"]})

A Titans language model (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663) of variant `{model["variant"]}`: {model["n_layers"]} layers, width {model["dim"]},
{model["n_heads"]} heads, vocabulary {model["vocab_size"]}, {parameters / 1e6:.2f}M parameters, weights in {dtype}.
Its neural memory keeps learning while it reads: `generate()` carries the memory state in the cache.

## Training

Trained with titans-train for {manifest["step"]} optimizer steps ({manifest.get("tokens_seen", 0):,} tokens) at
{train["precision"]}, sequence length {train["seq_len"]}, {train["global_batch_tokens"]:,} tokens per step, lr {train["lr"]}
({train["schedule"]}); layout tp={parallel["tp"]}, sp={parallel["sp"]}, ZeRO {parallel["zero_stage"]}, world size
{manifest.get("world_size")}. Data: `{run["data"]["source"]}`, tokenizer `{run["data"]["tokenizer"]}`.
Converted from `{consolidated.checkpoint}` by `titans-train convert`. The full run config is
`titans_run` in config.json.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # needs `pip install titans-train`
tokenizer = AutoTokenizer.from_pretrained(PATH)
ids = tokenizer(["def main("], return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=50, do_sample=False)[0]))
```
"""


def hf_config(consolidated: ConsolidatedModel, eos_id: int):
    from titans_train.hf import TitansHFConfig

    config = TitansHFConfig(titans=consolidated.model_config().to_dict(), eos_token_id=eos_id, pad_token_id=eos_id)
    config.titans_run = consolidated.run_config
    config.titans_source = {"checkpoint": str(consolidated.checkpoint), "step": consolidated.manifest["step"],
                            "tokens_seen": consolidated.manifest.get("tokens_seen", 0)}
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["TitansForCausalLM"]
    return config


def export_hf(consolidated: ConsolidatedModel, out: str | Path, tokenizer: str | None = None,
              dtype: str = "fp32", max_shard_size: str = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write the Hugging Face directory `out` (see the module docstring); returns it."""
    from transformers import GenerationConfig

    from titans_train.hf import TitansForCausalLM

    out = Path(out)
    if dtype not in DTYPES:
        raise ConversionError(out, f"unknown dtype {dtype!r}", f"use one of {sorted(DTYPES)}")
    spec = tokenizer or consolidated.run_config["data"]["tokenizer"]
    hf_tok, eos_id = hf_tokenizer(spec, int(consolidated.run_config["model"]["vocab_size"]))
    config = hf_config(consolidated, eos_id)
    with atomic_directory(out, overwrite, sources=(consolidated.checkpoint,)) as temporary:
        with torch.device("meta"):
            model = TitansForCausalLM(config)
        state = {HF_PREFIX + name: value.to(DTYPES[dtype]) for name, value in consolidated.state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        meta = [name for name, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ConversionError(consolidated.checkpoint, f"no weights for {meta}", "convert a complete checkpoint")
        model.save_pretrained(temporary, max_shard_size=max_shard_size)
        for name, text in REMOTE_CODE.items():
            (temporary / name).write_text(text)
        hf_tok.save_pretrained(temporary)
        GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(temporary)
        (temporary / "README.md").write_text(_model_card(consolidated, dtype))
    return out


def is_hf_directory(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "titans"


def read_hf(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(TitansLM full state dict, the training run's resolved config) from an exported directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConversionError(directory, "has no config.json: not a Hugging Face model directory",
                              "pass a directory written by `titans-train convert ... --to hf`")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "titans" or "titans_run" not in config:
        raise ConversionError(config_file, f"model_type {config.get('model_type')!r} without a titans_run config",
                              "pass a directory written by `titans-train convert ... --to hf`")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConversionError(directory, "has no .safetensors weights", "convert the checkpoint again")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as error:
            raise ConversionError(file, f"cannot be read ({type(error).__name__})", "convert the checkpoint again") from None
    run = dict(config["titans_run"])
    run["model"] = config["titans"]
    weights = {name.removeprefix(HF_PREFIX): value for name, value in state.items()}
    if config["titans"].get("tie_embeddings", True):
        weights.pop("lm_head.weight", None)
    return weights, run


def checkpoint_module_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TitansLM paths -> the names a ZeRO-0 training checkpoint stores (`model.` prefix)."""
    return {TRAINER_PREFIX + name: value for name, value in weights.items()}
