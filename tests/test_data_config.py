"""Training on your own shards with nothing but data.train_dir (+ validation_dir): data.source,
data.tokenizer, train.seq_len and model.vocab_size come from the manifest (a BPE tokenizer of 300
ids and seq_len 32, where the debug recipe says byte / 64 / 264); an explicit command-line value
that disagrees is refused by name with both values and the fix; a corrupted shard stops the run
with one line naming the shard file and member (exit 2) instead of training on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from titans_train.cli import main
from titans_train.config import load_recipe
from titans_train.config.errors import InvalidValueError
from titans_train.data.prepare import prepare_dataset
from titans_train.data.shards import TAR_BLOCK, SampleLayout
from titans_train.data.synthetic import synthetic_documents, write_corpus
from titans_train.data.train_tokenizer import train_tokenizer

SEQ_LEN = 32
VOCAB = 300


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("own-shards")
    write_corpus(str(root / "train-corpus"), synthetic_documents(120, 60, seed=1), "jsonl")
    write_corpus(str(root / "validation-corpus"), synthetic_documents(20, 60, seed=2), "jsonl")
    tokenizer = train_tokenizer([str(root / "train-corpus")], str(root / "bpe.json"), VOCAB)
    for split in ("train", "validation"):
        prepare_dataset([str(root / f"{split}-corpus")], str(root / split), tokenizer, SEQ_LEN, shard_bytes=16_000,
                        num_workers=1, progress=False)
    return {"train": str(root / "train"), "validation": str(root / "validation"), "tokenizer": tokenizer,
            "root": str(root)}


def test_train_dir_alone_decides_source_tokenizer_seq_len_and_vocabulary(own_shards):
    config = load_recipe("debug", [f"data.train_dir={own_shards['train']}"])
    assert config.data.source == "shards"
    assert config.data.tokenizer == os.path.abspath(own_shards["tokenizer"])
    assert config.train.seq_len == SEQ_LEN and config.model.vocab_size == VOCAB
    # Explicit values that agree are kept (a larger vocabulary pads; the same tokenizer by another path).
    config = load_recipe("debug", [f"data.train_dir={own_shards['train']}", f"train.seq_len={SEQ_LEN}",
                                   "model.vocab_size=320", f"data.tokenizer={own_shards['tokenizer']}",
                                   "data.source=shards"])
    assert config.model.vocab_size == 320 and config.train.seq_len == SEQ_LEN


CONFLICTS = [
    ("train.seq_len=64", "train.seq_len", ["64", f"seq_len {SEQ_LEN}", "--seq-len 64"]),
    ("data.tokenizer=byte", "data.tokenizer", ["byte but", "bpe.json", "--tokenizer byte"]),
    ("model.vocab_size=264", "model.vocab_size", ["264", f"{VOCAB} ids", f">= {VOCAB}"]),
    ("data.source=builtin", "data.source", ["builtin", "drop data.source"]),
]


@pytest.mark.parametrize("override, key, words", CONFLICTS, ids=[c[1] for c in CONFLICTS])
def test_an_explicit_value_that_disagrees_with_the_manifest_is_refused_by_name(own_shards, override, key, words):
    with pytest.raises(InvalidValueError) as caught:
        load_recipe("debug", [f"data.train_dir={own_shards['train']}", override])
    assert caught.value.key == key and "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_data_verify_level_is_checked():
    with pytest.raises(InvalidValueError, match="data.verify: 'ful' is not one of none, sampled, full"):
        load_recipe("debug", ["data.verify=ful"])


def train(*overrides: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("TITANS_TRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", "train.steps=2",
                           "train.warmup_steps=1", *overrides], capture_output=True, text=True, timeout=400,
                          env=environment)


def test_shards_only_training_runs_and_a_corrupted_shard_stops_it_by_name(own_shards, tmp_path):
    done = train(f"data.train_dir={own_shards['train']}", f"data.validation_dir={own_shards['validation']}",
                 f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]

    corrupted = str(tmp_path / "corrupted")
    shutil.copytree(own_shards["train"], corrupted)
    layout = SampleLayout(SEQ_LEN, "uint16")
    for name in sorted(os.listdir(corrupted)):
        if name.endswith(".tar"):  # one flipped token byte in every member: the first read meets one
            path = os.path.join(corrupted, name)
            data = bytearray(open(path, "rb").read())
            for start in range(0, len(data) - layout.member_bytes, layout.member_bytes):
                data[start + TAR_BLOCK + layout.npy_header_bytes + 2] ^= 0x01
            open(path, "wb").write(bytes(data))
    done = train(f"data.train_dir={corrupted}", f"run_dir={tmp_path / 'run2'}")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{corrupted}/shard-" in errors[0] and ": member " in errors[0] and "does not match its digest" in errors[0]


def test_prepare_format_txt_reads_files_without_a_suffix(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    documents = synthetic_documents(6, 50, seed=4)
    for index, document in enumerate(documents):
        (corpus / ("sub" if index % 2 else "") / f"doc{index}").write_text(document)
    (corpus / ".hidden").write_text("not corpus")
    named = tmp_path / "LICENSE"
    named.write_text(documents[0])
    with pytest.raises(Exception, match=r"LICENSE has an unsupported format.*--format txt"):
        prepare_dataset([str(named)], str(tmp_path / "refused"), "byte", 16, num_workers=1, progress=False)
    assert main(["data", "prepare", str(corpus), str(named), "-o", str(tmp_path / "out"), "--seq-len", "16",
                 "--format", "txt", "--workers", "1", "--quiet"]) == 0
    assert "from 7 documents" in capsys.readouterr().out  # six in the directory (not .hidden) + LICENSE
