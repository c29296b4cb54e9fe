"""Haystacks: the text needles and facts are hidden in, as token ids, deterministic from a seed.

- `repeat`: RULER's noise haystack, one short paragraph repeated;
- `natural`: real text, by default the built-in corpus's held-out files (the Python standard
  library modules its split puts in validation, read in sorted order: no download), or any
  token stream (a prepared held-out split, `eval --data`).
A haystack of n tokens is a slice of the text's tokens at an offset drawn from the probe's own
random generator, wrapping around at the end.
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np

HAYSTACKS = ("repeat", "natural")
REPEATED = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def builtin_text(held_out: bool = True) -> str:
    """The built-in corpus's validation files (held_out) or training files, concatenated in sorted order."""
    from titans_train.data.builtin import is_validation, stdlib_files

    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for relative in stdlib_files(stdlib):
        if is_validation(relative) == held_out:
            with open(os.path.join(stdlib, relative), encoding="utf-8", errors="replace") as handle:
                parts.append(handle.read())
    return "\n".join(parts)


class Haystack:
    def __init__(self, kind: str, tokens: np.ndarray):
        if len(tokens) == 0:
            raise ValueError(f"the {kind} haystack has no tokens")
        self.kind = kind
        self.tokens = np.asarray(tokens, dtype=np.int64)

    @classmethod
    def build(cls, kind: str, tokenizer, stream: np.ndarray | None = None) -> "Haystack":
        """`kind` from HAYSTACKS; `stream` (token ids) replaces the built-in natural text."""
        if kind == "repeat":
            return cls(kind, np.asarray(tokenizer.encode(REPEATED)))
        if stream is not None:
            return cls(kind, stream)
        return cls(kind, np.asarray(tokenizer.encode(builtin_text())))

    def take(self, count: int, rng: np.random.Generator) -> list[int]:
        """`count` consecutive tokens (wrapping); the repeated haystack always starts at 0."""
        start = 0 if self.kind == "repeat" else int(rng.integers(0, len(self.tokens)))
        index = (start + np.arange(count)) % len(self.tokens)
        return self.tokens[index].tolist()
