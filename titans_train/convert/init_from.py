"""`train.init_from`: start a run from the weights of a checkpoint of any layout or a `--to hf`
directory. The weights go into the plain `TitansLM` before parallelisation, which then shards
them for the run's own layout (tp, sp, ZeRO), whatever layout wrote them."""

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


def load_initial_weights(model, source: str | Path) -> None:
    """Copy the weights of `source` into `model` (a plain TitansLM of the run's model config)."""
    from titans_train.convert.consolidate import load_full_state

    try:
        weights, model_dict = initial_weights(source)
    except ConversionError as error:
        raise InvalidValueError("train.init_from", str(error)) from None
    ours = model.config.to_dict()
    differing = sorted(key for key in ours if ours[key] != model_dict.get(key))
    if differing:
        key = differing[0]
        raise InvalidValueError("train.init_from", f"{source} has model.{key}={model_dict.get(key)!r}, this run "
                                f"model.{key}={ours[key]!r} (differing: {differing}); use the source's model config")
    load_full_state(model, {name: value.float() for name, value in weights.items()}, Path(source))
