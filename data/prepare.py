"""`prepare_dataset`: corpus files -> tokenized, globally shuffled webdataset shards + manifest.

Stages, each restartable (an interrupted run is simply run again):
1. tokenize every source file in a process pool (documents joined with EOS) into a cached token
   file under `<output>/.prepare-work/`, written under a temporary name and renamed (many
   files: one file per task, read by the worker; few files: the main process reads and hands out
   batches of documents);
2. join the files' tokens into one stream (sorted file order), cut it into samples of
   seq_len + 1 tokens (the tail shorter than one sample is dropped), and permute them (seed);
3. write the shards in the pool, each under a temporary name and renamed;
4. write `manifest.json` last, atomically, then remove the work directory.
A directory without a manifest is never read as a dataset, so no half-written state is visible.

`prepare_stage` runs the same stages split over array tasks (tokenize: a slice of the files per
task; shards: a part of the shards per task; merge: the manifest), giving the identical dataset;
`titans-train slurm prepare` submits them (docs/slurm.md).

Scaling: the shuffle is the seeded Feistel permutation the loader uses (`order.permute`), so each
shard's samples are computed on their own in O(shard) memory, never a permutation of the whole
corpus; the token stream is memory-mapped from disk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset  # noqa: F401  imported before the pool forks (it pulls in torch, ~5 s) so workers inherit it

from titans_train.data.errors import DataError, EmptyInputError, WorkerDiedError
from titans_train.data.manifest import MANIFEST_NAME, Manifest, write_manifest
from titans_train.data.order import derive_seed, permute
from titans_train.data.shards import SampleLayout, ShardInfo, digests_name, write_shard
from titans_train.data.sources import expand_inputs, read_documents
from titans_train.data.tokenizer import load_tokenizer, token_dtype

WORK_DIR = ".prepare-work"
BATCH_TEXT_BYTES = 1 << 20  # documents are sent to the pool in batches of about 1 MiB of text
DEFAULT_SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class _Reading:
    """How documents are read from a source file: the jsonl/parquet field and the imposed format."""

    text_field: str = "text"
    input_format: str | None = None  # None: by file suffix (see titans_train.data.sources)

    def __str__(self) -> str:
        return f"{self.text_field}\0{self.input_format}"


@dataclass
class _SourceTokens:
    path: str
    tokens_file: str
    num_tokens: int
    num_documents: int
    text_bytes: int


# --- worker side (process pool) ---------------------------------------------------------------

_worker_tokenizer = None
_worker_abort = None  # the pool's multiprocessing.Event: set, the queued tasks are skipped


def _init_worker(tokenizer_spec: str, eos_token: str | None, abort=None) -> None:
    global _worker_tokenizer, _worker_abort
    _worker_tokenizer = load_tokenizer(tokenizer_spec, eos_token)
    _worker_abort = abort


def _init_pool_worker(tokenizer_spec: str, eos_token: str | None, abort) -> None:
    """A pool worker ignores Ctrl-C: the terminal sends SIGINT to the whole process group, and the
    main process answers it by setting `abort` (see _Workers), which stops the tasks cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(tokenizer_spec, eos_token, abort)


def _aborting() -> bool:
    """Worker: whether the pool is stopping after an error (see _Workers)."""
    return _worker_abort is not None and _worker_abort.is_set()


def _unless_aborted(function, item):
    """Worker: function(item), or None once the pool is stopping."""
    return None if _aborting() else function(item)


def _tokenize_batch(item: tuple[int, list[str], bool]) -> tuple[int, np.ndarray, int, int, bool]:
    """Tokens of the documents, each followed by EOS, plus (document count, text bytes)."""
    file_index, documents, is_last = item
    tokenizer = _worker_tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    if hasattr(tokenizer, "encode_array"):
        encoded = [tokenizer.encode_array(document) for document in documents]
    else:
        encoded = tokenizer.encode_batch(documents)
    eos = np.asarray([tokenizer.eos_id], dtype=dtype)
    pieces = []
    for ids in encoded:
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(eos)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    text_bytes = sum(len(document.encode("utf-8")) for document in documents)
    return file_index, tokens, len(documents), text_bytes, is_last


def _shard_keys(start: int, count: int, num_samples: int, seed: int) -> np.ndarray:
    """Stream positions (keys) of the samples stored at places [start, start + count) of the shuffle."""
    return permute(np.arange(start, start + count, dtype=np.int64), num_samples, derive_seed("prepare", seed), 0)


def _write_shard_job(job: tuple) -> ShardInfo:
    path, stream_file, dtype, (start, count, num_samples, seed), layout = job
    keys = _shard_keys(start, count, num_samples, seed)
    stream = np.memmap(stream_file, dtype=dtype, mode="r")
    width = layout.tokens_per_sample
    # Sample k is stream[k * width : (k + 1) * width]; sorted reads keep the disk access sequential.
    order = np.argsort(keys, kind="stable")
    gathered = np.empty((len(keys), width), dtype=dtype)
    for row, key in zip(order, keys[order]):
        gathered[row] = stream[key * width : (key + 1) * width]
    return write_shard(path, keys, gathered, layout)


# --- main side --------------------------------------------------------------------------------


def _atomic_write_json(path: str, content: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(content, handle)
    os.replace(temporary, path)


def _source_key(path: str, tokenizer_sha: str, reading: _Reading) -> str:
    stat = os.stat(path)
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{tokenizer_sha}\0{reading}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def _document_batches(files: list[tuple[int, str]], reading: _Reading) -> Iterator[tuple[int, list[str], bool]]:
    for file_index, path in files:
        batch: list[str] = []
        size = 0
        for document in read_documents(path, reading.text_field, reading.input_format):
            batch.append(document)
            size += len(document)
            if size >= BATCH_TEXT_BYTES:
                yield file_index, batch, False
                batch, size = [], 0
        yield file_index, batch, True


def _progress(total: int | None, unit: str, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=description, file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


class _TokenFile:
    """One source's token file, appended batch by batch under a temporary name, then renamed."""

    def __init__(self, source: _SourceTokens, dtype: str) -> None:
        self.source = source
        self.dtype = dtype
        self._temporary = f"{source.tokens_file}.tmp-{os.getpid()}"
        self._handle = open(self._temporary, "wb")

    def append(self, tokens: np.ndarray, num_documents: int, text_bytes: int) -> None:
        self._handle.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.source.num_tokens += len(tokens)
        self.source.num_documents += num_documents
        self.source.text_bytes += text_bytes

    def finish(self) -> None:
        self._handle.close()
        os.replace(self._temporary, self.source.tokens_file)
        _atomic_write_json(self.source.tokens_file + ".json", {
            "num_tokens": self.source.num_tokens, "num_documents": self.source.num_documents,
            "text_bytes": self.source.text_bytes,
        })


def _tokenize_file_job(job: tuple[int, _SourceTokens, str]) -> tuple[int, _SourceTokens] | None:
    """Worker: read, tokenize and write one whole source file (used when there are many files)."""
    file_index, source, reading = job
    token_file = _TokenFile(source, token_dtype(_worker_tokenizer.vocab_size))
    for batch in _document_batches([(file_index, source.path)], reading):
        if _aborting():
            return None  # the pool is stopping after an error; the temporary file is never renamed
        _, tokens, num_documents, text_bytes, _ = _tokenize_batch(batch)
        token_file.append(tokens, num_documents, text_bytes)
    token_file.finish()
    return file_index, source


def _tokenize_sources(files, tokenizer, eos_token, reading, work_dir, pool, num_workers, progress):
    """Token files for every source, reusing those an interrupted earlier run finished.

    Many files: each worker reads, tokenizes and writes whole files. Few files: the main process
    reads and the pool tokenizes ~1 MiB batches in order. Both write the same token files.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    results: list[_SourceTokens] = []
    pending: list[int] = []
    for index, path in enumerate(files):
        key = _source_key(path, tokenizer.identity.sha256, reading)
        tokens_file = os.path.join(work_dir, f"tokens-{key}.bin")
        record_file = tokens_file + ".json"
        if os.path.exists(record_file) and os.path.exists(tokens_file):
            with open(record_file) as handle:
                results.append(_SourceTokens(path, tokens_file, **json.load(handle)))
        else:
            pending.append(index)
            results.append(_SourceTokens(path, tokens_file, 0, 0, 0))
    if not pending:
        return results
    if pool is None:
        _init_worker(tokenizer.spec, eos_token)
    with _progress(None, "B", "tokenize", progress) as bar:
        if pool is not None and len(pending) >= 2 * num_workers:
            jobs = [(index, results[index], reading) for index in pending]
            for index, source in pool.imap_unordered(_tokenize_file_job, jobs):
                results[index] = source
                bar.update(source.text_bytes)
            return results
        batches = _document_batches([(index, files[index]) for index in pending], reading)
        outputs = map(_tokenize_batch, batches) if pool is None else pool.imap(_tokenize_batch, batches)
        open_files: dict[int, _TokenFile] = {}
        for file_index, tokens, num_documents, text_bytes, is_last in outputs:
            if file_index not in open_files:
                open_files[file_index] = _TokenFile(results[file_index], dtype)
            open_files[file_index].append(tokens, num_documents, text_bytes)
            bar.update(text_bytes)
            if is_last:
                open_files.pop(file_index).finish()
    return results


def _join_stream(sources: list[_SourceTokens], dtype: str, work_dir: str) -> tuple[str, int]:
    key = hashlib.sha256("\0".join(s.tokens_file for s in sources).encode()).hexdigest()[:24]
    stream_file = os.path.join(work_dir, f"stream-{key}.bin")
    total = sum(s.num_tokens for s in sources)
    if os.path.exists(stream_file) and os.path.getsize(stream_file) == total * np.dtype(dtype).itemsize:
        return stream_file, total
    temporary = f"{stream_file}.tmp-{os.getpid()}"
    with open(temporary, "wb") as out:
        for source in sources:
            with open(source.tokens_file, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    os.replace(temporary, stream_file)
    return stream_file, total


@dataclass
class _Setup:
    """What every stage of one prepare derives identically from its arguments."""

    files: list[str]
    reading: _Reading
    tokenizer: object
    work_dir: str
    dtype: str
    layout: SampleLayout
    num_workers: int


def _setup(inputs, output_dir: str, tokenizer: str, seq_len: int, eos_token, num_workers, reading: _Reading) -> _Setup:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    output_prefix = os.path.join(os.path.abspath(output_dir), "")
    # The output may sit inside an input directory: its manifest and work files are not corpus.
    files = [f for f in expand_inputs(inputs, reading.input_format) if not f.startswith(output_prefix)]
    if not files:
        raise EmptyInputError(f"inputs {inputs} hold no corpus file outside the output directory {output_dir}")
    tokenizer_object = load_tokenizer(tokenizer, eos_token)
    dtype = token_dtype(tokenizer_object.vocab_size)
    return _Setup(files, reading, tokenizer_object, os.path.join(output_dir, WORK_DIR), dtype, SampleLayout(seq_len, dtype),
                  num_workers or os.cpu_count() or 1)


def _start_output(output_dir: str, overwrite: bool) -> None:
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        if not overwrite:
            raise DataError(
                f"{output_dir} already holds a prepared dataset ({manifest_path}); pass a new "
                "directory or overwrite=True (CLI: --overwrite)"
            )
        # The directory stops being a dataset before anything changes (several tasks may race here).
        with contextlib.suppress(FileNotFoundError):
            os.remove(manifest_path)
    os.makedirs(os.path.join(output_dir, WORK_DIR), exist_ok=True)


class _Workers:
    """A process pool's ordered and unordered map, with a bounded number of tasks in flight.

    On a ProcessPoolExecutor: a worker that dies mid-task (the kernel's out-of-memory killer's
    SIGKILL, say) breaks the executor, which fails every pending task at once, where
    multiprocessing.Pool replaces the worker and waits for the lost task's result forever. After
    any other error `_worker_pool` sets the workers' abort event: the queued tasks return at once,
    the running ones stop at their next batch, and the executor shuts down killing none of them
    (Pool.terminate() could kill one holding its result queue's lock, then wait on it forever).
    """

    def __init__(self, executor: concurrent.futures.ProcessPoolExecutor, num_workers: int):
        self.executor = executor
        # Enough to keep every worker busy, without reading a whole corpus of batches ahead.
        self.in_flight = 2 * num_workers

    def imap(self, function, items):
        """function(item) for each item, in the items' order."""
        pending = collections.deque()
        for item in items:
            pending.append(self._submit(function, item))
            if len(pending) >= self.in_flight:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())

    def imap_unordered(self, function, items):
        """function(item) for each item, as they finish."""
        pending = set()
        for item in items:
            pending.add(self._submit(function, item))
            if len(pending) >= self.in_flight:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                yield from (_result(future) for future in done)
        yield from (_result(future) for future in concurrent.futures.as_completed(pending))

    def _submit(self, function, item) -> concurrent.futures.Future:
        with _dead_worker_as_error():
            return self.executor.submit(_unless_aborted, function, item)


def _result(future: concurrent.futures.Future):
    with _dead_worker_as_error():
        return future.result()


@contextlib.contextmanager
def _dead_worker_as_error():
    """A broken pool (one of its workers died, and with it the task it ran; submit and result both
    raise it) as the error naming the cause and the fix."""
    try:
        yield
    except concurrent.futures.process.BrokenProcessPool:
        raise WorkerDiedError(
            "a prepare worker process died mid-task (killed: the kernel's out-of-memory killer sends SIGKILL when "
            "memory runs out; see dmesg or the job's memory limit). The token files and shards finished so far are "
            "kept: run the same command again, with fewer --workers or more memory") from None


@contextlib.contextmanager
def _worker_pool(setup: _Setup, eos_token):
    if setup.num_workers <= 1:
        yield None
        return
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks unguarded scripts.
    # The workers only tokenize and write files, never touch torch, so forking is safe.
    context = multiprocessing.get_context("fork")
    abort = context.Event()
    executor = _single_threaded_tokenizers(lambda: _started(concurrent.futures.ProcessPoolExecutor(
        setup.num_workers, mp_context=context, initializer=_init_pool_worker,
        initargs=(setup.tokenizer.spec, eos_token, abort))))
    try:
        yield _Workers(executor, setup.num_workers)
    except BaseException:
        abort.set()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _started(executor: concurrent.futures.ProcessPoolExecutor) -> concurrent.futures.ProcessPoolExecutor:
    """The executor with its workers running: under fork it starts them all at the first task."""
    _result(executor.submit(os.getpid))
    return executor


def _shard_jobs(setup: _Setup, sources: list[_SourceTokens], output_dir: str, seed: int, shard_bytes: int):
    """(every shard's write job, the plan string naming them) from the joined token stream."""
    num_documents = sum(s.num_documents for s in sources)
    if num_documents == 0:
        files = setup.files
        raise EmptyInputError(f"inputs {files[:5]}{'...' if len(files) > 5 else ''} contain no text; "
                              "point at non-empty corpus files (or check --text-field)")
    stream_file, num_tokens = _join_stream(sources, setup.dtype, setup.work_dir)
    layout = setup.layout
    num_samples = num_tokens // layout.tokens_per_sample
    if num_samples == 0:
        raise EmptyInputError(
            f"the corpus has {num_tokens} tokens, fewer than one sample of seq_len + 1 = "
            f"{layout.tokens_per_sample}; add text or lower --seq-len"
        )
    per_shard = max(1, shard_bytes // layout.member_bytes)
    jobs = []
    for shard_index, start in enumerate(range(0, num_samples, per_shard)):
        path = os.path.join(output_dir, f"shard-{shard_index:06d}.tar")
        count = min(per_shard, num_samples - start)
        jobs.append((path, stream_file, setup.dtype, (start, count, num_samples, seed), layout))
    plan = f"{stream_file}\0{seed}\0{layout.seq_len}\0{setup.dtype}\0{per_shard}\0{num_samples}\0feistel"
    return jobs, plan


def _finish(setup: _Setup, sources: list[_SourceTokens], shard_infos: list[ShardInfo], output_dir: str,
            seed: int) -> Manifest:
    keep = {info.file for info in shard_infos} | {digests_name(info.file) for info in shard_infos}
    for name in os.listdir(output_dir):
        if name.startswith("shard-") and name.endswith((".tar", ".crc32")) and name not in keep:
            os.remove(os.path.join(output_dir, name))  # leftovers of an earlier, different prepare
        elif name.startswith("shard-") and ".tmp-" in name:
            os.remove(os.path.join(output_dir, name))  # a writer killed mid-write; every shard is written now
    tokenizer = setup.tokenizer
    manifest = Manifest(
        tokenizer={**tokenizer.identity.as_dict(), "vocab_size": tokenizer.vocab_size,
                   "eos_id": tokenizer.eos_id, "spec": tokenizer.spec},
        seq_len=setup.layout.seq_len,
        dtype=setup.dtype,
        shards=[info.as_dict() for info in shard_infos],
        sources=[{"path": s.path, "documents": s.num_documents, "tokens": s.num_tokens,
                  "text_bytes": s.text_bytes} for s in sources],
        num_documents=sum(s.num_documents for s in sources),
        num_tokens=sum(s.num_tokens for s in sources),
        text_bytes=sum(s.text_bytes for s in sources),
        shuffle_seed=seed,
        text_field=setup.reading.text_field,
    ).finalize()
    write_manifest(output_dir, manifest)
    shutil.rmtree(setup.work_dir, ignore_errors=True)
    return manifest


def prepare_dataset(
    inputs: list[str] | str,
    output_dir: str,
    tokenizer: str = "byte",
    seq_len: int = 2048,
    *,
    text_field: str = "text",
    input_format: str | None = None,
    eos_token: str | None = None,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Tokenize `inputs` into webdataset shards of seq_len + 1 token samples under `output_dir`.

    inputs: files, directories (searched recursively) or globs of .txt/.jsonl/.parquet files,
    optionally .gz/.zst compressed; input_format "txt" / "jsonl" / "parquet" reads every file in
    that format whatever its suffix. num_workers: tokenizer processes (default: all cores).
    Returns the manifest, which is also written to `output_dir/manifest.json` (last).
    """
    setup = _setup(inputs, output_dir, tokenizer, seq_len, eos_token, num_workers, _Reading(text_field, input_format))
    _start_output(output_dir, overwrite)
    with _worker_pool(setup, eos_token) as pool:
        sources = _tokenize_sources(setup.files, setup.tokenizer, eos_token, setup.reading, setup.work_dir, pool,
                                    setup.num_workers, progress)
        jobs, plan = _shard_jobs(setup, sources, output_dir, seed, shard_bytes)
        shard_infos = _write_shards(jobs, setup.work_dir, pool, progress, plan)
    return _finish(setup, sources, shard_infos, output_dir, seed)


# --- the same prepare split over an array of tasks (titans-train slurm prepare) ---------------
STAGES = ("tokenize", "shards", "merge")


def task_slice(items: list, task: int, num_tasks: int) -> list:
    """Task `task`'s contiguous part of `items` (sizes differ by at most one)."""
    return items[task * len(items) // num_tasks : (task + 1) * len(items) // num_tasks]


def _file_slice(files: list[str], task: int, num_tasks: int) -> list[str]:
    """Task `task`'s files: contiguous in sorted order, cut where the bytes before a file cross
    task / num_tasks of the total, so tasks get similar amounts of text (a pure function of the
    file list and sizes, the same on every node)."""
    sizes = np.array([os.path.getsize(f) for f in files], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(sizes)[:-1]]) / max(sizes.sum(), 1.0)
    owners = np.minimum((starts * num_tasks).astype(np.int64), num_tasks - 1)
    return [f for f, owner in zip(files, owners) if owner == task]


def prepare_stage(
    stage: str,
    task: int,
    num_tasks: int,
    inputs: list[str] | str,
    output_dir: str,
    tokenizer: str = "byte",
    seq_len: int = 2048,
    *,
    text_field: str = "text",
    input_format: str | None = None,
    eos_token: str | None = None,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest | None:
    """One task of a prepare split over `num_tasks` processes (or machines sharing `output_dir`).

    Run every task of "tokenize", then every task of "shards", then "merge" once (SLURM: three
    array jobs chained with afterok). tokenize: task t tokenizes its slice of the files into the
    shared work directory; shards: task t writes its contiguous part of the shards of the one
    global shuffle; merge: writes the manifest. The result is byte for byte the dataset
    `prepare_dataset` writes from the same arguments (same shards, same manifest), because each
    stage computes the same things from the same inputs; only who does the work changes.
    """
    if stage not in STAGES:
        raise DataError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    if num_tasks < 1 or not 0 <= task < num_tasks:
        raise DataError(f"--task {task} is outside [0, --num-tasks {num_tasks}); give 0 <= task < num_tasks")
    setup = _setup(inputs, output_dir, tokenizer, seq_len, eos_token, num_workers, _Reading(text_field, input_format))
    if stage == "tokenize":
        _start_output(output_dir, overwrite)
        with _worker_pool(setup, eos_token) as pool:
            _tokenize_sources(_file_slice(setup.files, task, num_tasks), setup.tokenizer, eos_token, setup.reading,
                              setup.work_dir, pool, setup.num_workers, progress)
        return None
    sources = _tokenized_sources(setup)
    with _stream_lock(setup.work_dir):  # one task joins the stream, the others wait and reuse it
        jobs, plan = _shard_jobs(setup, sources, output_dir, seed, shard_bytes)
    if stage == "shards":
        with _worker_pool(setup, None) as pool:
            _write_shards(task_slice(jobs, task, num_tasks), setup.work_dir, pool, progress, plan, part=f"{task}of{num_tasks}")
        return None
    shard_infos = _recorded_shards(jobs, setup.work_dir, plan)
    return _finish(setup, sources, shard_infos, output_dir, seed)


def _tokenized_sources(setup: _Setup) -> list[_SourceTokens]:
    """Every file's token record, which the tokenize stage must have written."""
    sources = []
    for path in setup.files:
        key = _source_key(path, setup.tokenizer.identity.sha256, setup.reading)
        tokens_file = os.path.join(setup.work_dir, f"tokens-{key}.bin")
        if not (os.path.exists(tokens_file + ".json") and os.path.exists(tokens_file)):
            raise DataError(f"{path} has not been tokenized into {setup.work_dir}: run every task of --stage tokenize "
                            "first, with the same inputs and options (or the file changed since)")
        with open(tokens_file + ".json") as handle:
            sources.append(_SourceTokens(path, tokens_file, **json.load(handle)))
    return sources


@contextlib.contextmanager
def _stream_lock(work_dir: str):
    with open(os.path.join(work_dir, "stream.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _recorded_shards(jobs, work_dir: str, plan: str) -> list[ShardInfo]:
    done: dict[str, dict] = {}
    for record in glob.glob(os.path.join(work_dir, f"shards-{_plan_key(plan)}-*.json")):
        with open(record) as handle:
            done.update(json.load(handle))
    missing = [os.path.basename(job[0]) for job in jobs if not _shard_done(job[0], done)]
    if missing:
        raise DataError(f"{len(missing)} shards (first {missing[0]}) are not written: run every task of --stage shards "
                        "first, with the same inputs and options")
    return [ShardInfo(**done[os.path.basename(job[0])]) for job in jobs]


def _single_threaded_tokenizers(start_pool):
    """Start the pool with TOKENIZERS_PARALLELISM=false in its environment: one thread per worker
    process (the pool is the parallelism), and no fork warning from `tokenizers`. The caller's own
    environment is left as it was."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return start_pool()
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _plan_key(plan: str) -> str:
    return hashlib.sha256(plan.encode()).hexdigest()[:24]


def _write_shards(jobs, work_dir, pool, progress, plan: str, part: str = "all") -> list[ShardInfo]:
    """Write the shards not already written by an interrupted earlier run of the same plan.

    `part` names this writer's record file, so tasks writing parts of one plan never share one.
    """
    record_file = os.path.join(work_dir, f"shards-{_plan_key(plan)}-{part}.json")
    done: dict[str, dict] = {}
    if os.path.exists(record_file):
        with open(record_file) as handle:
            done = json.load(handle)
    todo = [job for job in jobs if not _shard_done(job[0], done)]
    outputs = map(_write_shard_job, todo) if pool is None else pool.imap(_write_shard_job, todo)
    with _progress(len(jobs), "shard", "write", progress) as bar:
        bar.update(len(jobs) - len(todo))
        for info in outputs:
            done[info.file] = info.as_dict()
            _atomic_write_json(record_file, done)
            bar.update(1)
    return [ShardInfo(**done[os.path.basename(job[0])]) for job in jobs]


def _shard_done(path: str, done: dict[str, dict]) -> bool:
    record = done.get(os.path.basename(path))
    return (record is not None and os.path.exists(path) and os.path.getsize(path) == record["bytes"]
            and os.path.exists(os.path.join(os.path.dirname(path), digests_name(os.path.basename(path)))))
