"""Data pipeline: tokenizers, corpus preparation into webdataset shards, the resumable loader.

See docs/data.md. Imports are lazy so `import titans_train.data` stays cheap (webdataset and
torch load only when shards or the loader are used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_tokenizer": "titans_train.data.tokenizer",
    "ByteTokenizer": "titans_train.data.tokenizer",
    "JsonTokenizer": "titans_train.data.tokenizer",
    "prepare_dataset": "titans_train.data.prepare",
    "builtin_corpus": "titans_train.data.builtin",
    "PreparedDataset": "titans_train.data.dataset",
    "read_manifest": "titans_train.data.manifest",
    "TokenLoader": "titans_train.data.loader",
    "sequence_span": "titans_train.data.loader",
    "train_tokenizer": "titans_train.data.train_tokenizer",
    "DataError": "titans_train.data.errors",
    "EmptyInputError": "titans_train.data.errors",
    "ManifestError": "titans_train.data.errors",
    "TokenizerError": "titans_train.data.errors",
    "TokenizerMismatchError": "titans_train.data.errors",
    "SeqLenMismatchError": "titans_train.data.errors",
    "ShardError": "titans_train.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'titans_train.data' has no attribute {name!r}")
