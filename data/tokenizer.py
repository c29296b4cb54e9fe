"""Tokenizers: the built-in byte-level one and any `tokenizers` JSON file.

A tokenizer's identity is its name plus the sha256 of its content; prepared datasets record it and
loaders refuse a dataset whose identity differs from the run's tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from titans_train.data.errors import TokenizerError

# End-of-text tokens tried, in order, when a tokenizer JSON file is given without `eos_token`.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}

    def __str__(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:12]})"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus EOS = 256. vocab_size = 257. Needs no file."""

    # The identity hashes this description: change it whenever the mapping changes.
    DESCRIPTION = "titans-train byte tokenizer v1: utf-8 bytes are ids 0-255; eos is 256; vocab 257"
    eos_id = 256
    vocab_size = 257

    def __init__(self) -> None:
        digest = hashlib.sha256(self.DESCRIPTION.encode()).hexdigest()
        self.identity = TokenizerIdentity("byte", digest)
        self.spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint8 array without building a Python list (prepare's fast path)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        # EOS has no byte; show it as a newline-free marker so decoded streams stay readable.
        out = bytearray()
        for token in ids:
            token = int(token)
            if token == self.eos_id:
                out += b"<|endoftext|>"
            elif 0 <= token < 256:
                out.append(token)
            else:
                raise ValueError(f"byte tokenizer: id {token} is out of range [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizers` JSON file (for example a Llama-2 `tokenizer.json`)."""

    def __init__(self, path: str, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        try:
            with open(path, "rb") as handle:
                content = handle.read()
            self._tokenizer = Tokenizer.from_str(content.decode("utf-8"))
        except FileNotFoundError:
            raise TokenizerError(
                f"tokenizer file {path} does not exist; pass 'byte' or the path of a tokenizers "
                "JSON file (train one with `titans-train data train-tokenizer`)"
            ) from None
        except Exception as error:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(
                f"tokenizer file {path} is not a valid `tokenizers` JSON file ({error}); "
                "pass a tokenizer.json as saved by `tokenizers.Tokenizer.save`"
            ) from None
        self.spec = os.path.abspath(path)
        name = os.path.basename(path)
        self.identity = TokenizerIdentity(name, hashlib.sha256(content).hexdigest())
        # One past the largest id (not the entry count): ids need not be contiguous.
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = self._find_eos(path, eos_token)

    def _find_eos(self, path: str, eos_token: str | None) -> int:
        candidates = (eos_token,) if eos_token else KNOWN_EOS_TOKENS
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise TokenizerError(
            f"tokenizer {path} has no end-of-text token among {list(candidates)}; "
            "name it with eos_token (CLI: --eos-token)"
        )

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """`"byte"` for the built-in byte-level tokenizer, else the path of a `tokenizers` JSON file."""
    if isinstance(spec, (ByteTokenizer, JsonTokenizer)):
        return spec
    if spec == "byte":
        if eos_token is not None:
            raise TokenizerError("the byte tokenizer's EOS is fixed (id 256); drop eos_token")
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise TokenizerError(f"tokenizer spec must be 'byte' or a JSON file path, got {spec!r}")
    return JsonTokenizer(os.fspath(spec), eos_token)


def token_dtype(vocab_size: int) -> str:
    """Shards store uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"
