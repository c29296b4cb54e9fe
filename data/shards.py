"""Webdataset tar shards of fixed-length token samples: writing, and random access by index.

Each sample is one tar member `{key}.tokens.npy` holding a 1-D array of seq_len + 1 token ids
(uint16 or uint32): a plain webdataset that `webdataset.WebDataset(url).decode()` reads as numpy.
The writer makes every member the same size (fixed-width keys, fixed mtime, ustar headers), so
sample i of a shard starts at byte i * member_bytes: the loader memory-maps a shard and reads any
sample in O(1) without scanning the archive, which is what makes random access scale to large
shards. The member header is still checked on every read, so a file of another layout is caught.

Content digests: next to each shard `shard-N.tar`, `shard-N.crc32` holds one little-endian uint32
per sample, the CRC-32 of that sample's whole member (tar header, .npy header, tokens, padding:
`member_bytes` bytes); the manifest records the sidecar's sha256. A reader checks members against
it as it reads them (`VERIFY_LEVELS`, docs/data.md): a flipped byte names its shard and member
instead of training silently. The file-level sha256 (`data verify`) reads the whole shard.
"""

from __future__ import annotations

import functools
import hashlib
import io
import mmap
import os
import zlib
from dataclasses import dataclass

import numpy as np

from titans_train.data.errors import ShardError

TAR_BLOCK = 512
MEMBER_SUFFIX = ".tokens.npy"
KEY_WIDTH = 12  # sample keys are zero-padded stream positions: up to 10^12 samples per dataset
FIXED_MTIME = 0  # identical inputs give byte-identical shards
DIGESTS_SUFFIX = ".crc32"
DIGEST_DTYPE = np.dtype("<u4")
# data.verify: "none" checks the layout only (shard size and .npy header when a shard is first
# opened, the member name on every read); "sampled" also checks every token id against the
# vocabulary and the digest of one member read in SAMPLED_EVERY; "full" checks every member read.
VERIFY_LEVELS = ("none", "sampled", "full")
SAMPLED_EVERY = 8


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, tokens, version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class SampleLayout:
    """Byte layout of one sample member, a pure function of (seq_len, dtype)."""

    seq_len: int
    dtype: str

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len + 1

    @functools.cached_property  # a reader is made per shard opened: compute once per layout
    def npy_header_bytes(self) -> int:
        empty = np.zeros(self.tokens_per_sample, dtype=self.dtype)
        return len(_npy_bytes(empty)) - empty.nbytes

    @functools.cached_property
    def member_bytes(self) -> int:
        data = self.npy_header_bytes + self.tokens_per_sample * np.dtype(self.dtype).itemsize
        return TAR_BLOCK + -(-data // TAR_BLOCK) * TAR_BLOCK


def sample_key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def digests_name(shard_file: str) -> str:
    """The digest sidecar of a shard: `shard-000001.tar` -> `shard-000001.crc32`."""
    return shard_file.rsplit(".", 1)[0] + DIGESTS_SUFFIX


class _HashingFile:
    """A write-only file that hashes and counts what passes through it, and takes the CRC-32 of
    every `stride`-byte window (one window per tar member of a fixed-layout shard)."""

    def __init__(self, path: str, stride: int) -> None:
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0
        self.window_crcs: list[int] = []
        self._stride = stride
        self._crc = 0
        self._fill = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes_written += len(data)
        view = memoryview(data)
        while len(view):
            piece = view[: self._stride - self._fill]
            self._crc = zlib.crc32(piece, self._crc)
            self._fill += len(piece)
            if self._fill == self._stride:
                self.window_crcs.append(self._crc)
                self._crc, self._fill = 0, 0
            view = view[len(piece):]
        return self._file.write(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the dataset directory
    samples: int
    bytes: int
    sha256: str
    digests_sha256: str = ""  # of the `.crc32` sidecar; empty: prepared before member digests existed

    def as_dict(self) -> dict:
        return {"file": self.file, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                "digests_sha256": self.digests_sha256}


def _write_atomic(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_shard(path: str, keys: np.ndarray, samples: np.ndarray, layout: SampleLayout) -> ShardInfo:
    """Write samples (n, seq_len + 1) under their keys to `path` and their member digests to its
    sidecar, each atomically (temp file + rename; the sidecar first, so a present shard has one)."""
    import webdataset

    if samples.ndim != 2 or samples.shape[1] != layout.tokens_per_sample:
        raise ValueError(f"samples must be (n, {layout.tokens_per_sample}), got {samples.shape}")
    samples = samples.astype(layout.dtype, copy=False)
    temporary = f"{path}.tmp-{os.getpid()}"
    sink = _HashingFile(temporary, layout.member_bytes)
    try:
        writer = webdataset.TarWriter(sink, encoder=False, mtime=FIXED_MTIME, user="", group="", mode=0o444)
        # Every sample has the same shape and dtype, so the .npy header is built once.
        npy_header = _npy_bytes(samples[0])[: layout.npy_header_bytes] if len(samples) else b""
        for key, tokens in zip(keys, samples):
            writer.write({"__key__": sample_key(int(key)), "tokens.npy": npy_header + tokens.tobytes()})
        writer.close()
        sink.close()
        expected_payload = len(samples) * layout.member_bytes
        if sink.bytes_written < expected_payload:
            raise RuntimeError(f"shard {path}: wrote {sink.bytes_written} bytes, expected >= {expected_payload}")
        # Windows past the samples are the archive's end blocks, not members.
        digests = np.asarray(sink.window_crcs[: len(samples)], dtype=DIGEST_DTYPE).tobytes()
        _write_atomic(digests_name(path), digests)
        os.replace(temporary, path)
    except BaseException:
        sink._file.close()
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return ShardInfo(os.path.basename(path), len(samples), sink.bytes_written, sink.sha256.hexdigest(),
                     hashlib.sha256(digests).hexdigest())


def file_sha256(path: str, block_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


class ShardReader:
    """Random access to the samples of one shard.

    `open()` memory-maps the file (and, unless verify is "none", reads its digests); `close()`
    drops the map, so a dataset of many shards keeps only a bounded number open
    (`PreparedDataset`, which also decides which reads check their digest). Reading a closed
    reader reopens it. vocab_size: token ids must be below it (checked unless verify is "none").
    """

    def __init__(self, path: str, info: ShardInfo, layout: SampleLayout, fix_hint: str,
                 verify: str = "full", vocab_size: int | None = None) -> None:
        self.path = path
        self.info = info
        self.layout = layout
        self.verify = verify
        self.vocab_size = vocab_size
        self._fix_hint = fix_hint
        self._stride = layout.member_bytes
        self._token_offset = TAR_BLOCK + layout.npy_header_bytes
        self._map: mmap.mmap | None = None
        self._digests: np.ndarray | None = None

    @property
    def is_open(self) -> bool:
        return self._map is not None

    def open(self, checked: bool = False) -> None:
        """Memory-map the file after checking its size (and, unless `checked` says an earlier
        open of this shard in this process did, its .npy header and digest file's sha256)."""
        if self._map is not None:
            return
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise ShardError(f"shard {self.path} is missing; {self._fix_hint}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size != self.info.bytes:
                raise ShardError(
                    f"shard {self.path} has {size} bytes but the manifest says {self.info.bytes} "
                    f"(truncated or overwritten); {self._fix_hint}"
                )
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if self.verify != "none":
            self._digests = self._read_digests(check_sha256=not checked)
        if self.info.samples and not checked:
            self._check_npy_header()

    def close(self) -> None:
        # Dropping the reference unmaps once no array returned by read() still views it.
        self._map = None
        self._digests = None

    def _read_digests(self, check_sha256: bool = True) -> np.ndarray:
        path = os.path.join(os.path.dirname(self.path), digests_name(os.path.basename(self.path)))
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise ShardError(f"digest file {path} is missing; {self._fix_hint}") from None
        if len(data) != self.info.samples * DIGEST_DTYPE.itemsize or \
                (check_sha256 and hashlib.sha256(data).hexdigest() != self.info.digests_sha256):
            raise ShardError(f"digest file {path} does not match its sha256 in the manifest; {self._fix_hint}")
        return np.frombuffer(data, dtype=DIGEST_DTYPE)

    def _check_npy_header(self) -> None:
        """The first member's .npy header must describe the layout the reads assume."""
        member = io.BytesIO(bytes(self._map[TAR_BLOCK : self._stride]))
        try:
            if np.lib.format.read_magic(member) != (1, 0):
                raise ValueError("not npy format version 1.0")
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        except ValueError as error:
            raise ShardError(f"shard {self.path}: sample 0 is not a .npy array ({error}); {self._fix_hint}") from None
        expected = ((self.layout.tokens_per_sample,), np.dtype(self.layout.dtype))
        if (shape, dtype) != expected or member.tell() != self.layout.npy_header_bytes:
            raise ShardError(
                f"shard {self.path}: samples are {dtype}{list(shape)} with a {member.tell()}-byte header, "
                f"expected {expected[1]}{list(expected[0])} with {self.layout.npy_header_bytes}; {self._fix_hint}"
            )

    def verify_checksum(self) -> None:
        """The whole file's sha256 (reads every byte) and, when recorded, the digest file's."""
        self.open()
        if file_sha256(self.path) != self.info.sha256:
            raise ShardError(f"shard {self.path} does not match its sha256 in the manifest; {self._fix_hint}")
        if self.info.digests_sha256 and self._digests is None:
            self._read_digests()

    def read(self, index: int, check_digest: bool = False) -> tuple[int, np.ndarray]:
        """(key, tokens) of sample `index` of this shard; tokens is (seq_len + 1,) of the shard dtype.

        check_digest: compare the member with its recorded CRC-32 (needs verify != "none")."""
        self.open()
        start = index * self._stride
        header = bytes(self._map[start : start + TAR_BLOCK])
        name = header[:100].rstrip(b"\0").decode("ascii", errors="replace")
        if not name.endswith(MEMBER_SUFFIX) or len(name) != KEY_WIDTH + len(MEMBER_SUFFIX):
            raise ShardError(
                f"shard {self.path}: member {index} is {name!r}, not a token sample at the expected "
                f"offset (corrupted, or not written by titans-train); {self._fix_hint}"
            )
        if check_digest:
            if zlib.crc32(self._map[start : start + self._stride]) != self._digests[index]:
                raise ShardError(
                    f"shard {self.path}: member {index} ({name}) does not match its digest (corrupted "
                    f"bytes); check the whole dataset with `titans-train data verify`, then {self._fix_hint}"
                )
        tokens = np.frombuffer(
            self._map, dtype=self.layout.dtype, count=self.layout.tokens_per_sample,
            offset=start + self._token_offset,
        )
        if self.verify != "none" and self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:
            raise ShardError(
                f"shard {self.path}: member {index} ({name}) holds token id {int(tokens.max())}, outside the "
                f"tokenizer's vocabulary of {self.vocab_size}; check it with `titans-train data verify`, "
                f"then {self._fix_hint}"
            )
        return int(name[:KEY_WIDTH]), tokens

    def __getstate__(self) -> dict:
        # Loader workers reopen the map in their own process.
        state = self.__dict__.copy()
        state["_map"] = None
        state["_digests"] = None
        return state
