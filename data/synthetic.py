"""Synthetic data for tests and benchmarks: small corpora of pseudo-random words (unique per
document), and manifests of any size whose shard files are never written (scale tests)."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

from titans_train.data.manifest import Manifest, write_manifest
from titans_train.data.shards import SampleLayout
from titans_train.data.tokenizer import ByteTokenizer

WORDS = ("memory", "surprise", "momentum", "forget", "gate", "token", "chunk", "layer", "head",
         "state", "attention", "window", "segment", "persistent", "gradient", "titans", "learn")


def synthetic_documents(num_documents: int, words_per_document: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(num_documents):
        words = rng.choice(WORDS, size=words_per_document)
        documents.append(f"doc {index}: " + " ".join(words) + f" {rng.integers(1 << 30)}.")
    return documents


def write_corpus(directory: str, documents: list[str], kind: str = "txt") -> list[str]:
    """Write documents as one .txt per document ('txt'), or one .jsonl / .jsonl.gz file. Returns paths."""
    os.makedirs(directory, exist_ok=True)
    if kind == "txt":
        paths = []
        for index, document in enumerate(documents):
            path = os.path.join(directory, f"doc-{index:05d}.txt")
            with open(path, "w") as handle:
                handle.write(document)
            paths.append(path)
        return paths
    lines = "".join(json.dumps({"text": document}) + "\n" for document in documents).encode()
    if kind == "jsonl":
        path = os.path.join(directory, "corpus.jsonl")
        with open(path, "wb") as handle:
            handle.write(lines)
    elif kind == "jsonl.gz":
        path = os.path.join(directory, "corpus.jsonl.gz")
        with gzip.open(path, "wb") as handle:
            handle.write(lines)
    else:
        raise ValueError(f"kind must be txt, jsonl or jsonl.gz, got {kind!r}")
    return [path]


def numbered_documents(num_documents: int, numbers_per_document: int, first_number: int = 0) -> list[str]:
    """Documents of consecutive 7-digit numbers: any 15 consecutive bytes (or byte tokens) hold one
    whole number, so every sample of seq_len >= 15 is distinct and names its place in the corpus."""
    documents, number = [], first_number
    for _ in range(num_documents):
        documents.append(" ".join(f"{n:07d}" for n in range(number, number + numbers_per_document)))
        number += numbers_per_document
    return documents


def synthetic_manifest(directory: str, tokens: int, shards: int, seq_len: int, seed: int = 0) -> Manifest:
    """Write a byte-tokenizer manifest of `tokens` tokens (cut into samples of seq_len + 1) over
    `shards` shards of near-equal sample counts, without writing any shard: for testing and
    timing everything above the files (manifest, index, order, loader state) at any scale."""
    layout = SampleLayout(seq_len, "uint16")
    samples = tokens // layout.tokens_per_sample
    counts = np.full(shards, samples // shards, dtype=np.int64)
    counts[: samples % shards] += 1
    tokenizer = ByteTokenizer()
    manifest = Manifest(
        tokenizer={**tokenizer.identity.as_dict(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                   "spec": tokenizer.spec},
        seq_len=seq_len, dtype=layout.dtype,
        shards=[{"file": f"shard-{index:06d}.tar", "samples": int(count), "bytes": int(count) * layout.member_bytes,
                 "sha256": "0" * 64, "digests_sha256": "0" * 64} for index, count in enumerate(counts)],
        sources=[], num_documents=samples, num_tokens=samples * layout.tokens_per_sample,
        text_bytes=samples * layout.tokens_per_sample, shuffle_seed=seed,
    ).finalize()
    os.makedirs(directory, exist_ok=True)
    write_manifest(directory, manifest)
    return manifest
