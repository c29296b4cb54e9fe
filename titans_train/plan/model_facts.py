"""What the planner needs to know about a model, read from the model code on the meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titans_train.model import TitansConfig, TitansLM
from titans_train.parallel.tensor_parallel import padded_vocab_size, plan_style


@dataclass(frozen=True)
class ModelFacts:
    parameters: int  # unique parameters of the whole model (tied weights once)
    parameters_per_tp_rank: int  # what one tp rank holds before ZeRO: shards + replicated
    layer_parameters_per_tp_rank: int  # one layer's share of that (ZeRO-3 gathers a layer)
    column_projections: int  # column-parallel projections per layer (input gradient all-reduced)
    row_projections: int  # row-parallel projections per layer (output all-reduced)


def _per_rank(path: str, param: torch.Tensor, config: TitansConfig, tp: int) -> int:
    style = plan_style(path) or plan_style(path.rpartition(".")[0])
    if style == "replicated":
        return param.numel()
    if style in ("vocab_embedding", "vocab_head"):
        return padded_vocab_size(config.vocab_size, tp) // tp * config.dim
    return param.numel() // tp


def model_facts(config: TitansConfig, tp: int) -> ModelFacts:
    with torch.device("meta"):
        model = TitansLM(config)
    total = per_rank = layer0 = 0
    for path, param in model.named_parameters():  # a tied tensor once
        share = _per_rank(path, param, config, tp)
        total += param.numel()
        per_rank += share
        if path.startswith("layers.0."):
            layer0 += share
    styles = [plan_style(path) for path, _ in model.layers[0].named_modules(prefix="layers.0")]
    return ModelFacts(parameters=total, parameters_per_tp_rank=per_rank,
                      layer_parameters_per_tp_rank=layer0,
                      column_projections=styles.count("column"),
                      row_projections=styles.count("row") + styles.count("row_to_local_channels"))
