"""Prepare: formats, round trip shards -> documents' token stream, determinism, interrupt + rerun,
a killed worker + rerun, and the typed errors (empty input, truncated / missing / corrupted shard, tokenizer and seq_len
mismatch)."""

from __future__ import annotations

import json
import os
import signal
import tarfile

import numpy as np
import pytest

from titans_train.data import prepare as prepare_module
from titans_train.data.dataset import PreparedDataset
from titans_train.data.errors import (
    DataError, EmptyInputError, ManifestError, SeqLenMismatchError, ShardError, TokenizerMismatchError,
    WorkerDiedError,
)
from titans_train.data.manifest import read_manifest
from titans_train.data.prepare import prepare_dataset
from titans_train.data.shards import SampleLayout
from titans_train.data.synthetic import synthetic_documents, write_corpus
from titans_train.data.tokenizer import ByteTokenizer, load_tokenizer

SEQ_LEN = 31


def token_stream(documents: list[str], tokenizer) -> np.ndarray:
    """The reference: every document's tokens followed by EOS, in order."""
    pieces = []
    for document in documents:
        pieces += tokenizer.encode(document) + [tokenizer.eos_id]
    return np.asarray(pieces, dtype=np.int64)


def read_shards_plainly(directory: str) -> dict[int, np.ndarray]:
    """Key -> tokens, read with tarfile + numpy only (any webdataset reader sees the same)."""
    import io

    samples = {}
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(directory, shard["file"])) as archive:
            members = archive.getmembers()
            assert len(members) == shard["samples"]
            for member in members:
                key, extension = member.name.split(".", 1)
                assert extension == "tokens.npy"
                samples[int(key)] = np.load(io.BytesIO(archive.extractfile(member).read()))
    return samples


def assert_round_trip(directory: str, documents: list[str], tokenizer) -> None:
    stream = token_stream(documents, tokenizer)
    samples = read_shards_plainly(directory)
    width = SEQ_LEN + 1
    num_samples = len(stream) // width
    assert sorted(samples) == list(range(num_samples))
    assert list(samples) != sorted(samples)  # stored globally shuffled
    rebuilt = np.concatenate([samples[key] for key in range(num_samples)]).astype(np.int64)
    np.testing.assert_array_equal(rebuilt, stream[: num_samples * width])
    # webdataset's own reader sees the same samples.
    import webdataset

    urls = [os.path.join(directory, shard["file"]) for shard in json.load(open(os.path.join(directory, "manifest.json")))["shards"]]
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        np.testing.assert_array_equal(sample["tokens.npy"], samples[int(sample["__key__"])])
    # The random-access reader agrees with the plain tar reader, sample by sample.
    dataset = PreparedDataset(directory, tokenizer, SEQ_LEN)
    keys, tokens = dataset.read(np.arange(len(dataset)))
    for key, row in zip(keys, tokens):
        np.testing.assert_array_equal(row, samples[int(key)])


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return synthetic_documents(60, 40, seed=1)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz"])
def test_round_trip_byte_tokenizer(tmp_path, documents, kind):
    write_corpus(str(tmp_path / "corpus"), documents, kind)
    manifest = prepare_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "byte", SEQ_LEN,
                               shard_bytes=10_000, num_workers=1, progress=False)
    assert len(manifest.shards) > 3  # several shards, so shard boundaries are exercised
    assert manifest.dtype == "uint16" and manifest.num_documents == len(documents)
    assert_round_trip(str(tmp_path / "out"), documents, ByteTokenizer())


def test_round_trip_parquet_and_zstd(tmp_path, documents):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Sorted file order: a.parquet (first half), b.jsonl.zst (second half).
    pq.write_table(pa.table({"body": documents[:30]}), corpus / "a.parquet", row_group_size=7)
    lines = "".join(json.dumps({"body": d}) + "\n" for d in documents[30:]).encode()
    (corpus / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (corpus / "index.html").write_text("<html>not corpus</html>")  # a glob skips other files
    prepare_dataset([str(corpus / "*")], str(tmp_path / "out"), "byte", SEQ_LEN, text_field="body",
                    num_workers=2, progress=False)
    assert_round_trip(str(tmp_path / "out"), documents, ByteTokenizer())


def test_round_trip_json_tokenizer_with_uint32_ids(tmp_path, documents):
    """A `tokenizers` JSON file whose vocabulary exceeds 2^16 ids is stored as uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1}
    words = sorted({w for d in documents for w in d.split()})
    for index, word in enumerate(words):
        vocab[word] = 70_000 + index  # ids beyond uint16
    for filler in range(2, 200):
        vocab[f"filler{filler}"] = filler
    tokenizer_json = tmp_path / "words.json"
    word_tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_tokenizer.save(str(tokenizer_json))
    tokenizer = load_tokenizer(str(tokenizer_json))
    assert tokenizer.eos_id == 1
    write_corpus(str(tmp_path / "corpus"), documents, "jsonl")
    manifest = prepare_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), str(tokenizer_json),
                               SEQ_LEN, num_workers=2, progress=False)
    assert manifest.dtype == "uint32"
    assert manifest.tokenizer["sha256"] == tokenizer.identity.sha256
    assert_round_trip(str(tmp_path / "out"), documents, tokenizer)


def test_output_inside_the_input_directory_is_not_read_back(tmp_path, documents):
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), documents, "jsonl")
    first = prepare_dataset([str(corpus)], str(corpus / "out"), "byte", SEQ_LEN, num_workers=1, progress=False)
    again = prepare_dataset([str(corpus)], str(corpus / "out"), "byte", SEQ_LEN, num_workers=1,
                            overwrite=True, progress=False)
    assert again.num_documents == first.num_documents == len(documents)
    assert again.fingerprint == first.fingerprint


def test_prepare_is_deterministic_and_resumes_after_interrupt(tmp_path, documents, monkeypatch):
    write_corpus(str(tmp_path / "corpus"), documents, "txt")
    inputs = [str(tmp_path / "corpus")]
    clean = prepare_dataset(inputs, str(tmp_path / "clean"), "byte", SEQ_LEN, shard_bytes=10_000,
                            num_workers=1, progress=False)

    real_write_shard = prepare_module.write_shard
    written = []

    def failing_write_shard(path, keys, samples, layout):
        if len(written) == 2:
            raise KeyboardInterrupt  # the user hits Ctrl-C while the third shard is written
        written.append(path)
        return real_write_shard(path, keys, samples, layout)

    monkeypatch.setattr(prepare_module, "write_shard", failing_write_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(inputs, str(tmp_path / "out"), "byte", SEQ_LEN, shard_bytes=10_000,
                        num_workers=1, progress=False)
    names = os.listdir(tmp_path / "out")
    assert "manifest.json" not in names and not any(".tmp" in n for n in names)
    with pytest.raises(ManifestError, match="not a prepared dataset"):
        PreparedDataset(str(tmp_path / "out"))

    monkeypatch.setattr(prepare_module, "write_shard", real_write_shard)
    resumed = prepare_dataset(inputs, str(tmp_path / "out"), "byte", SEQ_LEN, shard_bytes=10_000,
                              num_workers=1, progress=False)
    assert resumed.fingerprint == clean.fingerprint  # byte-identical shards
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "clean"))


def test_worker_count_does_not_change_the_result(tmp_path, documents):
    """Inline (1 worker), whole files per worker (many files) and batches per worker (one file)."""
    write_corpus(str(tmp_path / "files"), documents, "txt")
    write_corpus(str(tmp_path / "one"), documents, "jsonl")
    fingerprints = set()
    for name, corpus, workers in (("a", "files", 1), ("b", "files", 2), ("c", "one", 2), ("d", "one", 1)):
        manifest = prepare_dataset([str(tmp_path / corpus)], str(tmp_path / name), "byte", SEQ_LEN,
                                   shard_bytes=10_000, num_workers=workers, progress=False)
        fingerprints.add(tuple(shard["sha256"] for shard in manifest.shards))
    assert len(fingerprints) == 1  # byte-identical shards


def killed_in_workers(function, when):
    """`function`, except that a worker process (not this one) calling it with arguments for which
    `when` holds SIGKILLs itself, as the out-of-memory killer would."""
    parent = os.getpid()

    def patched(*args):
        if os.getpid() != parent and when(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args)

    return patched


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corpus, target, when", [
    # (token_dtype: called by every tokenizing task in its worker; the tasks themselves are pickled.)
    ("files", "token_dtype", lambda vocab_size: True),
    ("one", "token_dtype", lambda vocab_size: True),
    ("files", "write_shard", lambda path, *_: path.endswith("shard-000001.tar")),
], ids=["tokenizing-whole-files", "tokenizing-batches", "writing-shards"])
def test_a_worker_killed_mid_task_fails_the_run_and_a_rerun_finishes_it(tmp_path, documents, monkeypatch, corpus,
                                                                         target, when):
    """A worker SIGKILLed mid-task fails the prepare at once with an error naming the cause and the
    fix (multiprocessing.Pool waited for the lost task forever); the same command run again gives
    the dataset a clean run gives, with no temporary file left."""
    write_corpus(str(tmp_path / "files"), documents, "txt")
    write_corpus(str(tmp_path / "one"), documents, "jsonl")
    inputs = [str(tmp_path / corpus)]
    clean = prepare_dataset(inputs, str(tmp_path / "clean"), "byte", SEQ_LEN, shard_bytes=10_000,
                            num_workers=1, progress=False)
    real = getattr(prepare_module, target)
    monkeypatch.setattr(prepare_module, target, killed_in_workers(real, when))
    with pytest.raises(WorkerDiedError, match="out-of-memory killer.*run the same command again.*--workers"):
        prepare_dataset(inputs, str(tmp_path / "out"), "byte", SEQ_LEN, shard_bytes=10_000, num_workers=2,
                        progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(prepare_module, target, real)
    resumed = prepare_dataset(inputs, str(tmp_path / "out"), "byte", SEQ_LEN, shard_bytes=10_000, num_workers=2,
                              progress=False)
    assert resumed.fingerprint == clean.fingerprint
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "clean"))


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(EmptyInputError, match="matches no file"):
        prepare_dataset([str(tmp_path / "missing*.txt")], str(tmp_path / "out"), seq_len=8, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyInputError, match="contain no text"):
        prepare_dataset([str(tmp_path / "empty.txt")], str(tmp_path / "out"), seq_len=8,
                        num_workers=1, progress=False)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(EmptyInputError, match="fewer than one sample"):
        prepare_dataset([str(tmp_path / "short.txt")], str(tmp_path / "out2"), seq_len=8,
                        num_workers=1, progress=False)
    (tmp_path / "table.parquet.gz").write_bytes(b"")
    with pytest.raises(EmptyInputError, match="parquet compresses internally"):
        prepare_dataset([str(tmp_path / "table.parquet.gz")], str(tmp_path / "out"), seq_len=8, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(EmptyInputError, match="--text-field"):
        prepare_dataset([str(tmp_path / "bad.jsonl")], str(tmp_path / "out3"), seq_len=8,
                        num_workers=1, progress=False)


@pytest.fixture()
def prepared(tmp_path, documents) -> str:
    write_corpus(str(tmp_path / "corpus"), documents, "jsonl")
    prepare_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "byte", SEQ_LEN,
                    shard_bytes=10_000, num_workers=1, progress=False)
    return str(tmp_path / "out")


def first_sample_of(dataset: PreparedDataset, shard_id: int) -> list[int]:
    return [int(np.searchsorted(dataset.locate(np.arange(len(dataset)))[0], shard_id))]


def test_truncated_shard_names_the_file_and_the_fix(prepared):
    shard = os.path.join(prepared, "shard-000001.tar")
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 700)
    dataset = PreparedDataset(prepared)  # shards open lazily: the size is checked at the first read
    dataset.read(first_sample_of(dataset, 0))
    with pytest.raises(ShardError, match=r"shard-000001\.tar has \d+ bytes .*truncated.*prepare the dataset"):
        dataset.read(first_sample_of(dataset, 1))
    with pytest.raises(ShardError, match=r"shard-000001\.tar has \d+ bytes"):
        PreparedDataset(prepared, verify="none").verify_all()


def test_missing_and_corrupted_shards(prepared):
    shard = os.path.join(prepared, "shard-000002.tar")
    data = bytearray(open(shard, "rb").read())
    data[SampleLayout(SEQ_LEN, "uint16").member_bytes - 10] ^= 0xFF  # same size, different bytes
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.tar does not match its sha256"):
        PreparedDataset(prepared, verify="none").verify_all()
    os.remove(shard)
    with pytest.raises(ShardError, match=r"shard-000002\.tar is missing"):
        PreparedDataset(prepared)  # presence is checked when the dataset opens, for every shard


def test_shard_of_another_layout(prepared):
    shard = os.path.join(prepared, "shard-000000.tar")
    data = open(shard, "rb").read()
    position = data.index(b"<u2", 512)  # the first member's .npy header: say uint32 instead
    open(shard, "wb").write(data[:position] + b"<u4" + data[position + 3 :])
    dataset = PreparedDataset(prepared, verify="none")
    with pytest.raises(ShardError, match=r"shard-000000\.tar: samples are uint32\[32\]"):
        dataset.read(first_sample_of(dataset, 0))


def test_tokenizer_and_seq_len_mismatch(prepared, tmp_path):
    from tokenizers import Tokenizer, models

    other = tmp_path / "other.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")).save(str(other))
    with pytest.raises(TokenizerMismatchError, match=r"manifest\.json was tokenized with byte .* uses other\.json"):
        PreparedDataset(prepared, tokenizer=str(other))
    with pytest.raises(SeqLenMismatchError, match=rf"seq_len {SEQ_LEN} but the run uses seq_len 64"):
        PreparedDataset(prepared, tokenizer="byte", seq_len=64)
    PreparedDataset(prepared, tokenizer="byte", seq_len=SEQ_LEN)


def test_edited_manifest_and_existing_output_are_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare_dataset([str(tmp_path / "corpus")], prepared, "byte", SEQ_LEN, num_workers=1, progress=False)
    path = os.path.join(prepared, "manifest.json")
    content = json.load(open(path))
    content["seq_len"] = 7
    json.dump(content, open(path, "w"))
    with pytest.raises(ManifestError, match="edited after prepare"):
        read_manifest(prepared)


def test_tokenizer_file_errors(tmp_path):
    from tokenizers import Tokenizer, models

    from titans_train.data.errors import TokenizerError

    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    no_eos = tmp_path / "no-eos.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(no_eos))
    with pytest.raises(TokenizerError, match="no end-of-text token.*--eos-token"):
        load_tokenizer(str(no_eos))
    assert load_tokenizer(str(no_eos), eos_token="a").eos_id == 1


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "Titans: ünïcode ✓ memory"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < 256 and tokenizer.vocab_size == 257
    assert load_tokenizer("byte").identity == tokenizer.identity
