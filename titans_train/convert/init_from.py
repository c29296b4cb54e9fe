"""`train.init_from`: start a run from the weights of a checkpoint of any layout or a `--to hf`
directory. The whole weights are read on every rank and each rank materialises its own part of
them for the run's layout (tp, sp, ZeRO; `titans_train.parallel.construction`), whatever layout
wrote them."""

from __future__ import annotations

from pathlib import Path

from titans_train.config import InvalidValueError
from titans_train.convert.errors import ConversionError


def initial_weights(source: str | Path):
    """(full TitansLM weights, the TitansConfig dict they belong to) from `source`."""
    from titans_train.convert.hf_export import is_hf_directory, read_hf

    source = Path(source)
    if is_hf_directory(source):
        weights, run = read_hf(source)
        return weights, dict(run["model"])
    from titans_train.convert.consolidate import consolidate

    consolidated = consolidate(source)
    return consolidated.state, consolidated.model_config().to_dict()


def load_initial_weights(model_config, source: str | Path) -> dict[str, "torch.Tensor"]:
    """The full weights of `source` for a run of `model_config` (a TitansConfig), fp32, by
    TitansLM parameter path; the source's model config and every parameter shape must match."""
    import torch

    from titans_train.model import TitansLM

    try:
        weights, model_dict = initial_weights(source)
    except ConversionError as error:
        raise InvalidValueError("train.init_from", str(error)) from None
    ours = model_config.to_dict()
    differing = sorted(key for key in ours if ours[key] != model_dict.get(key))
    if differing:
        key = differing[0]
        raise InvalidValueError("train.init_from", f"{source} has model.{key}={model_dict.get(key)!r}, this run "
                                f"model.{key}={ours[key]!r} (differing: {differing}); use the source's model config")
    with torch.device("meta"):
        shapes = {path: tuple(p.shape) for path, p in TitansLM(model_config).named_parameters()}
    tied_head = {"lm_head.weight"} if model_config.tie_embeddings else set()
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes) - tied_head)
    wrong = sorted(path for path in set(shapes) & set(weights) if tuple(weights[path].shape) != shapes[path])
    if missing or unexpected or wrong:
        raise InvalidValueError("train.init_from", f"{source}: weights do not match the model (missing {missing}, "
                                f"unexpected {unexpected}, other shapes {wrong}); convert a checkpoint written by "
                                "this version of titans-train")
    return {path: weights[path].float() for path in shapes}
