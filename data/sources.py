"""Corpus inputs: expand paths, globs and directories into files, and read documents from them.

Formats, by file name (after removing a `.gz`, `.zst` or `.zstd` compression suffix):
- `.txt` (and `.py`, `.md`, `.rst`): the whole file is one document;
- `.jsonl` / `.json`: one JSON object per line, the document is its `text_field`;
- `.parquet`: one document per row of the `text_field` column (never compressed outside).

`input_format` ("txt", "jsonl" or "parquet"; CLI `--format`) reads every input file in that format
whatever its name, so text files without a suffix (`README`, `LICENSE`, corpus dumps named by id)
can be prepared; directories are then searched for every file that is not hidden (a name starting
with "."). A compression suffix is still honoured.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator

from titans_train.data.errors import EmptyInputError

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")
INPUT_FORMATS = {"txt": "text", "jsonl": "jsonl", "parquet": "parquet"}  # --format -> reader kind


def _split_compression(path: str) -> tuple[str, str | None]:
    for suffix in COMPRESSION_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, None


def file_format(path: str, input_format: str | None = None) -> str | None:
    """'text', 'jsonl' or 'parquet' for a supported corpus file, else None.

    input_format: None reads the kind from the suffix; "txt" / "jsonl" / "parquet" impose it.
    """
    if input_format is not None:
        if input_format not in INPUT_FORMATS:
            raise EmptyInputError(f"--format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
        return INPUT_FORMATS[input_format]
    base, compression = _split_compression(path.lower())
    if base.endswith(PARQUET_SUFFIXES) and compression:
        return None  # parquet compresses inside the file; an outer .gz/.zst is not readable in place
    if base.endswith(TEXT_SUFFIXES):
        return "text"
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _found_in_directory(path: str, input_format: str | None) -> bool:
    if input_format is not None:
        return not os.path.basename(path).startswith(".")
    return file_format(path) is not None


def expand_inputs(inputs: list[str], input_format: str | None = None) -> list[str]:
    """Files named by `inputs` (files, directories searched recursively, globs), sorted, unique.

    Sorting makes the document order, and so the prepared dataset, independent of listing order.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: set[str] = set()
    for pattern in inputs:
        pattern = os.fspath(pattern)
        is_glob = glob.has_magic(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
        if not matches or not any(os.path.exists(m) for m in matches):
            raise EmptyInputError(
                f"input {pattern!r} matches no file; check the path (globs need quotes in the shell)"
            )
        for match in matches:
            if os.path.isdir(match):
                for root, dirs, names in os.walk(match):
                    dirs[:] = sorted(d for d in dirs if input_format is None or not d.startswith("."))
                    for name in names:
                        candidate = os.path.join(root, name)
                        if _found_in_directory(candidate, input_format):
                            files.add(os.path.abspath(candidate))
            elif file_format(match, input_format) is not None:
                files.add(os.path.abspath(match))
            elif not is_glob:  # a glob may match other files (READMEs, indexes); a named file must be readable
                raise EmptyInputError(
                    f"input {match} has an unsupported format; use .txt, .jsonl or .parquet "
                    "(.txt/.jsonl optionally .gz/.zst compressed; parquet compresses internally), "
                    "or name the format with --format txt|jsonl|parquet"
                )
    if not files:
        raise EmptyInputError(
            f"inputs {list(inputs)} contain no .txt/.jsonl/.parquet file; point at corpus files"
        )
    return sorted(files)


def _open_binary(path: str) -> io.BufferedIOBase:
    _, compression = _split_compression(path.lower())
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression in (".zst", ".zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def read_documents(path: str, text_field: str = "text", input_format: str | None = None) -> Iterator[str]:
    """The documents of one corpus file, in file order. Empty documents are skipped."""
    kind = file_format(path, input_format)
    if kind == "parquet":
        yield from _read_parquet(path, text_field)
        return
    with _open_binary(path) as raw:
        if kind == "text":
            text = raw.read().decode("utf-8", errors="replace")
            if text:
                yield text
            return
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        for line_number, line in enumerate(reader, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EmptyInputError(
                    f"{path}:{line_number} is not valid JSON ({error}); jsonl needs one object per line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise EmptyInputError(
                    f"{path}:{line_number} has no field {text_field!r}; pass the right --text-field"
                )
            text = record[text_field]
            if text:
                yield str(text)


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise EmptyInputError(
            f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
            "pass the right --text-field"
        )
    for group in range(parquet.num_row_groups):
        column = parquet.read_row_group(group, columns=[text_field]).column(0)
        for text in column.to_pylist():
            if text:
                yield str(text)
