"""SOURCE for evaluation: a run dir (its `latest`), a checkpoint dir, or a `convert --to hf` dir.

Checkpoints go through `titans-train generate`'s loader (`load_for_inference`: any layout is
consolidated by the conversion tool); a Hugging Face directory through the conversion tool's
reader (`read_hf`). Either way the result is a plain `TitansLM` with full weights, which
`parallelize` can then shard for the evaluation's own layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from titans_train.errors import UserError
from titans_train.eval.errors import SourceError


@dataclass
class LoadedModel:
    model: object  # TitansLM, eval mode, full weights on CPU
    tokenizer: object
    config: DictConfig  # the training run's resolved config
    origin: str  # the checkpoint or directory the weights came from
    step: int


def _hf_tokenizer_spec(directory: Path, run_spec: str) -> str:
    """The byte tokenizer stays built in; any other is the tokenizer.json shipped beside the model."""
    return "byte" if run_spec == "byte" else str(directory / "tokenizer.json")


def load_source(source: str | Path) -> LoadedModel:
    from titans_train.convert.errors import ConversionError
    from titans_train.convert.hf_export import is_hf_directory

    path = Path(source)
    if not path.is_dir():
        raise SourceError(source, "does not exist or is not a directory")
    try:
        if is_hf_directory(path):
            return _load_hf(path)
        from titans_train.generate import load_for_inference

        model, tokenizer, config, checkpoint = load_for_inference(path)
    except ConversionError as error:
        raise SourceError(source, str(error).rstrip(".")) from None
    except UserError as error:
        raise SourceError(source, str(error)) from None
    from titans_train.train.checkpoint import MANIFEST

    manifest = json.loads((Path(checkpoint) / MANIFEST).read_text())
    return LoadedModel(model, tokenizer, config, str(checkpoint), int(manifest.get("step", 0)))


def _load_hf(directory: Path) -> LoadedModel:
    from titans_train.config import config_from_container, model_config
    from titans_train.convert.consolidate import load_full_state
    from titans_train.convert.hf_export import read_hf
    from titans_train.data import load_tokenizer
    from titans_train.model import TitansLM

    weights, run = read_hf(directory)
    config = config_from_container(run)
    model = TitansLM(model_config(config))
    load_full_state(model, {name: value.float() for name, value in weights.items()}, directory)
    facts = json.loads((directory / "config.json").read_text()).get("titans_source", {})
    tokenizer = load_tokenizer(_hf_tokenizer_spec(directory, config.data.tokenizer))
    return LoadedModel(model.eval(), tokenizer, config, str(directory), int(facts.get("step", 0)))
