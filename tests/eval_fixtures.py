"""A tiny trained-looking model as every SOURCE kind evaluation reads, and a small held-out split.

The model is the debug MAC (2 layers, width 32, training length 64) with its memory gates
opened (theta and alpha biases 1.0, as in test_hf), so the memory visibly shapes the logits. It is
written as a one-file training checkpoint (`convert --to checkpoint`'s writer) and exported to a
Hugging Face directory from that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SEQ_LEN = 64


@dataclass
class EvalSources:
    data: str  # prepared held-out split
    run_dir: str  # holds checkpoints/latest
    checkpoint: str  # the tag directory
    hf: str


def prepare_held_out(root: Path) -> str:
    """A prepared split of ~40 samples of SEQ_LEN + 1 bytes."""
    from titans_train.data.prepare import prepare_dataset
    from titans_train.data.synthetic import numbered_documents, write_corpus

    write_corpus(str(root / "corpus"), numbered_documents(8, 30, 0), "jsonl")
    data = str(root / "held-out")
    prepare_dataset([str(root / "corpus")], data, "byte", SEQ_LEN, shard_bytes=1 << 14, num_workers=1,
                    progress=False)
    return data


def build_sources(root: Path) -> EvalSources:
    from titans_train.config import load_recipe, model_config, to_container
    from titans_train.convert.consolidate import consolidate
    from titans_train.convert.hf_export import export_hf
    from titans_train.convert.to_checkpoint import write_checkpoint
    from titans_train.model import TitansLM

    data = prepare_held_out(root)
    recipe = load_recipe("debug", ["data.source=shards", f"data.train_dir={data}", f"data.validation_dir={data}"])
    torch.manual_seed(0)
    model = TitansLM(model_config(recipe))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("theta_proj.bias", "alpha_proj.bias")):
                parameter.fill_(1.0)
    state = {name: value for name, value in model.state_dict().items() if name != "lm_head.weight"}
    checkpoint = write_checkpoint(state, to_container(recipe), root / "run" / "checkpoints", step=7)
    hf = export_hf(consolidate(checkpoint), root / "hf")
    return EvalSources(data, str(root / "run"), str(checkpoint), str(hf))
