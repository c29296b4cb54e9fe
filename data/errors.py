"""Typed errors for user mistakes in the data pipeline: each message names the file and the fix."""

from __future__ import annotations

from titans_train.errors import UserError


class DataError(UserError):
    """Base class: a problem with a corpus, a tokenizer or a prepared dataset (not a code bug)."""


class EmptyInputError(DataError):
    """The inputs matched no file, or the files held no text."""


class TokenizerError(DataError):
    """A tokenizer spec that cannot be loaded, or a tokenizer without an end-of-text token."""


class ManifestError(DataError):
    """A prepared dataset's manifest is missing, unreadable or disagrees with the run config."""


class TokenizerMismatchError(ManifestError):
    """The dataset was tokenized with a different tokenizer than the run uses."""


class SeqLenMismatchError(ManifestError):
    """The dataset's samples have a different length than the run's seq_len."""


class ShardError(DataError):
    """A shard file is missing, truncated or corrupted."""


class WorkerDiedError(DataError):
    """A prepare worker process died mid-task (killed, e.g. out of memory)."""
