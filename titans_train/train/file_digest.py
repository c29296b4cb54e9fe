"""Content digests of checkpoint files: xxh3-128, streamed.

The digest guards against damage (bit rot, a bad copy, a torn write that kept the size), not
against an adversary, so a non-cryptographic hash is enough, and xxh3 runs near memory speed,
an order of magnitude above sha256 and blake2b (`benchmarks/checkpoint_digest.py` prints the
comparison): digesting a checkpoint costs about as much as reading it once.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
CHUNK_BYTES = 8 << 20


def file_digest(path: str | Path) -> str:
    """Hex digest of the file's bytes."""
    digest = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()
