"""Writing a conversion's output directory atomically: complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from titans_train.convert.errors import ConversionError


def check_output(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an existing OUT without `overwrite`, and an OUT inside (or equal to) a source."""
    for source in sources:
        resolved_out, resolved_source = out.resolve(), source.resolve()
        if resolved_out == resolved_source or resolved_source in resolved_out.parents:
            raise ConversionError(out, f"is inside the source {source}", "write the output somewhere else")
    if out.exists() and not overwrite:
        raise ConversionError(out, "already exists", "pass --overwrite to replace it, or choose another OUT")


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename
    (an old `out` is moved aside first and deleted after). On failure `out` is left as it was."""
    check_output(out, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".partial-{out.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(temporary, out)
    shutil.rmtree(old, ignore_errors=True)
