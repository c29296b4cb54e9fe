"""The built-in corpus: the stdlib file list, a document-level split, and safe concurrent first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from titans_train.data.builtin import STDLIB_MODULES, is_validation, stdlib_files
from titans_train.data.dataset import PreparedDataset


def test_stdlib_file_list_is_real_and_split_by_document():
    files = stdlib_files()
    assert len(files) > 200 and files == sorted(files)
    assert not any("/test/" in f or "/tests/" in f or f.startswith("test/") for f in files)
    validation = [f for f in files if is_validation(f)]
    assert 0.02 < len(validation) / len(files) < 0.10


def _fake_stdlib(root) -> str:
    """A directory laid out like the stdlib: one module file per name, and a package with a test dir."""
    for index, name in enumerate(STDLIB_MODULES):
        (root / f"{name}.py").write_text(f'"""Module {name}."""\n' + f"VALUE_{index} = {index * 7919}\n" * 20)
    (root / "json").mkdir(exist_ok=True)
    (root / "json.py").unlink()
    (root / "json" / "__init__.py").write_text("# package\n" * 50)
    (root / "json" / "tests").mkdir()
    (root / "json" / "tests" / "test_x.py").write_text("excluded\n")
    return str(root)


def test_concurrent_first_use_is_safe(tmp_path):
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    _fake_stdlib(stdlib)
    cache = tmp_path / "cache"
    script = (
        "import json, sys\n"
        "from titans_train.data.builtin import builtin_corpus\n"
        f"paths = builtin_corpus({str(cache)!r}, 'byte', 64, num_workers=1, progress=False, stdlib_dir={str(stdlib)!r})\n"
        "print(json.dumps(paths))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outputs = [rank.communicate(timeout=240) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err for _, err in outputs]
    paths = {tuple(json.loads(out)) for out, _ in outputs}
    assert len(paths) == 1
    train_dir, validation_dir = paths.pop()
    train, validation = PreparedDataset(train_dir, "byte", 64), PreparedDataset(validation_dir, "byte", 64)
    train_sources = {os.path.basename(s["path"]) for s in train.manifest.sources}
    validation_sources = {os.path.basename(s["path"]) for s in validation.manifest.sources}
    assert validation_sources and not train_sources & validation_sources
    assert len(train_sources) + len(validation_sources) == len(STDLIB_MODULES)  # json/tests excluded
    leftovers = [n for n in os.listdir(os.path.dirname(train_dir)) if n not in ("train", "validation")]
    assert leftovers == []  # no temporary directories remain
