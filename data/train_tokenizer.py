"""Train a byte-level BPE tokenizer offline with the `tokenizers` library."""

from __future__ import annotations

import os
from collections.abc import Iterator

from titans_train.data.errors import DataError, EmptyInputError
from titans_train.data.sources import expand_inputs, read_documents

EOS_TOKEN = "<|endoftext|>"


def _documents(files: list[str], text_field: str) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field)


def train_tokenizer(inputs: list[str] | str, output_path: str, vocab_size: int = 32000, *,
                    text_field: str = "text", min_frequency: int = 2) -> str:
    """Train byte-level BPE (GPT-2 style; `<|endoftext|>` is the EOS) and save it as JSON atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small for byte-level BPE; use >= 257 (256 bytes + EOS)")
    files = expand_inputs(inputs)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for document in _documents(files, text_field):
            seen += 1
            yield document

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise EmptyInputError(f"inputs {files[:5]} contain no text to train a tokenizer on")
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{output_path}.tmp-{os.getpid()}"
    tokenizer.save(temporary)
    os.replace(temporary, output_path)
    return output_path
