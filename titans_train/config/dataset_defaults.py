"""The config keys a prepared dataset decides: the one place they are taken from its manifest.

With `data.train_dir` set, the training split's `manifest.json` says which tokenizer made the
tokens, how long a sample is and how many ids there are, so a run needs nothing else:

    data.source       "shards" (a train_dir means prepared shards)
    data.tokenizer    the manifest's tokenizer spec ("byte" or the tokenizer JSON it was made with)
    train.seq_len     the manifest's seq_len
    model.vocab_size  raised to the tokenizer's vocabulary when the recipe's is smaller (a larger
                      one is kept: padding ids cost embedding rows, not correctness)

A recipe's values for these keys are defaults the manifest replaces. A value given explicitly on
the command line is checked instead: one that disagrees with the manifest is a `ConfigError`
naming the key, both values and the fix. (The validation split is checked against the same
tokenizer and seq_len when the loaders open it.) A train_dir without a manifest on this machine
leaves the recipe's values as they are: the recipe can still be shown, planned and sized, and
training stops with a one-line ManifestError when its loader opens the directory.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from titans_train.config.errors import InvalidValueError


def _explicit(overrides: DictConfig, key: str):
    return OmegaConf.select(overrides, key, default=None)


def apply_dataset_manifest(config: DictConfig, overrides: DictConfig) -> None:
    """Fill (or check) data.source, data.tokenizer, train.seq_len and model.vocab_size from the
    manifest of `data.train_dir`. `overrides`: the command-line `key=value`s, the explicit values."""
    data = config.data
    if not data.train_dir:
        return
    from titans_train.data.manifest import MANIFEST_NAME, read_manifest
    from titans_train.data.tokenizer import load_tokenizer

    if data.source == "builtin":
        if _explicit(overrides, "data.source") == "builtin":
            raise InvalidValueError("data.source", f"is builtin but data.train_dir={data.train_dir} names prepared "
                                                   "shards; drop data.source (or data.train_dir)")
        data.source = "shards"
    if data.source != "shards":
        return  # validate() names the bad value
    where = os.path.join(data.train_dir, MANIFEST_NAME)
    if not os.path.exists(where):
        # Not prepared on this machine (yet): showing, planning or sizing a recipe needs no data,
        # and training stops when its loader opens the directory (a ManifestError naming it).
        return
    manifest = read_manifest(data.train_dir)  # an unreadable one: a ManifestError naming the file and the fix

    seq_len = _explicit(overrides, "train.seq_len")
    if seq_len is not None and seq_len != manifest.seq_len:
        raise InvalidValueError(
            "train.seq_len", f"{seq_len} but {where} holds samples of seq_len {manifest.seq_len}; drop the "
                             f"override, or prepare the corpus again with --seq-len {seq_len}")
    config.train.seq_len = manifest.seq_len

    recorded = manifest.tokenizer
    tokenizer = _explicit(overrides, "data.tokenizer")
    if tokenizer is not None and load_tokenizer(tokenizer).identity.sha256 != recorded["sha256"]:
        raise InvalidValueError(
            "data.tokenizer", f"{tokenizer} but {where} was tokenized with {recorded['name']} (sha256 "
                              f"{recorded['sha256'][:12]}); drop the override, or prepare the corpus again with "
                              f"--tokenizer {tokenizer}")
    data.tokenizer = tokenizer if tokenizer is not None else recorded.get("spec", recorded["name"])

    needed = int(recorded["vocab_size"])
    vocab_size = _explicit(overrides, "model.vocab_size")
    if vocab_size is not None and vocab_size < needed:
        raise InvalidValueError(
            "model.vocab_size", f"{vocab_size} but the tokenizer of {where} has {needed} ids; drop the "
                                f"override or set model.vocab_size >= {needed}")
    if config.model.vocab_size < needed:
        config.model.vocab_size = needed
