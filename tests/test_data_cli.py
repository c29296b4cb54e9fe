"""`titans-train data ...` end to end on a tiny corpus, in a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from titans_train.data.dataset import PreparedDataset
from titans_train.data.synthetic import synthetic_documents, write_corpus


def titans_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titans_train", "data", *args], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_train_tokenizer_prepare_inspect_verify(tmp_path):
    documents = synthetic_documents(80, 30, seed=7)
    write_corpus(str(tmp_path / "corpus"), documents, "jsonl.gz")
    tokenizer = tmp_path / "bpe.json"
    result = titans_train("train-tokenizer", str(tmp_path / "corpus"), "-o", str(tokenizer), "--vocab-size", "300")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "prepared"
    result = titans_train("prepare", str(tmp_path / "corpus" / "*.jsonl.gz"), "-o", str(out), "--seq-len", "16",
                          "--tokenizer", str(tokenizer), "--workers", "2", "--shard-mb", "0.01")
    assert result.returncode == 0, result.stderr
    assert "prepared" in result.stdout and "write" in result.stderr  # progress bars go to stderr
    dataset = PreparedDataset(str(out), tokenizer=str(tokenizer), seq_len=16)
    manifest = dataset.manifest
    assert manifest.num_documents == len(documents) and len(manifest.shards) > 1
    assert manifest.tokenizer["vocab_size"] == 300 and manifest.tokenizer["name"] == "bpe.json"

    result = titans_train("inspect", str(out), "--sample", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout[: result.stdout.index("\n}") + 2])
    assert summary["samples"] == len(dataset) and summary["fingerprint"] == manifest.fingerprint
    assert titans_train("verify", str(out)).returncode == 0

    shard = out / manifest.shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = titans_train("verify", str(out))
    assert result.returncode == 2 and "truncated" in result.stderr and str(shard) in result.stderr


def test_cli_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = titans_train("prepare", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "out"), "--seq-len", "8",
                          "--workers", "1")
    assert result.returncode == 2
    assert "contain no text" in result.stderr and "Traceback" not in result.stderr
