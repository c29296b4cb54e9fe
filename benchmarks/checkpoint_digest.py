"""What the checkpoint content digests cost (docs/checkpoints.md, "Integrity").

1. Digest throughput in MB/s over one file of `--file-mb` MB (in the page cache after the first
   pass, as a freshly written checkpoint is): reading alone, then reading + sha256, blake2b and
   xxh3-128 (`titans_train.train.file_digest`, what checkpoints use).
2. For each `--dims` width of the debug recipe's model (ZeRO-1, one process, so the checkpoint
   holds the weights, the fp32 master copy and both Adam moments): the time of one save
   (`CheckpointManager.save` + `confirm`) and one resume (`newest_usable`, which checks the
   digests, + `load`), with digests and with the digest function replaced by a no-op.

    .venv/bin/python benchmarks/checkpoint_digest.py --file-mb 512 --dims 256 512 --repeats 3

Prints medians. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CHUNK = 8 << 20


def _read_only(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK)
        while handle.readinto(buffer):
            pass


def _hashlib(name: str):
    def digest(path: Path) -> str:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, name).hexdigest()

    return digest


def digest_throughput(file_mb: int, repeats: int) -> dict[str, float]:
    from titans_train.train.file_digest import file_digest

    methods = {"read only": _read_only, "sha256": _hashlib("sha256"), "blake2b": _hashlib("blake2b"),
               "xxh3_128 (file_digest)": file_digest}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "payload.bin"
        with open(path, "wb") as handle:
            for _ in range(file_mb):
                handle.write(os.urandom(1 << 20))
        _read_only(path)  # into the page cache
        result = {}
        for name, method in methods.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                method(path)
                times.append(time.perf_counter() - start)
            result[name] = file_mb * (1 << 20) / 1e6 / statistics.median(times)
    return result


def save_and_load_times(dim: int, repeats: int, root: Path) -> dict[str, float]:
    """Trains one step of the debug model at width `dim`, then times saves and resumes."""
    from titans_train.config import load_recipe
    from titans_train.train import checkpoint
    from titans_train.train.callbacks import Callback, StopRequest
    from titans_train.train.trainer import train

    measured: dict[str, float] = {}
    real_digest = checkpoint.file_digest

    class Measure(Callback):
        def on_step_end(self, trainer, metrics):
            files = None
            modes = {"with digests": real_digest, "without digests": lambda path: ""}
            saves = {mode: [] for mode in modes}
            loads = {mode: [] for mode in modes}
            for _ in range(repeats):
                # Interleaved, so neither mode gets the warm (or cold) repeats.
                for mode, digest in modes.items():
                    checkpoint.file_digest = digest
                    start = time.perf_counter()
                    trainer.save()
                    trainer.confirm_checkpoint(metrics.loss, weights_step=trainer.step)  # promote at once
                    saves[mode].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    info = trainer.checkpoints.newest_usable()
                    trainer.checkpoints.load(trainer.engine, info)
                    loads[mode].append(time.perf_counter() - start)
                    files = info.path
            for mode in modes:
                measured[f"save s ({mode})"] = statistics.median(saves[mode])
                measured[f"resume s ({mode})"] = statistics.median(loads[mode])
            checkpoint.file_digest = real_digest
            measured["checkpoint MB"] = sum(p.stat().st_size for p in files.iterdir()) / 1e6
            trainer.request_stop(StopRequest(0, save=False, reason="measured"))

    config = load_recipe("debug", [f"run_dir={root / f'dim{dim}'}", f"model.dim={dim}", "parallel.zero_stage=1",
                                   "train.steps=3", "train.warmup_steps=1", "train.eval_batches=1"], world_size=1)
    train(config, callbacks=[Measure()])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-mb", type=int, default=256)
    parser.add_argument("--dims", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps({"digest MB/s": digest_throughput(args.file_mb, args.repeats)}, indent=1))
    with tempfile.TemporaryDirectory() as root:
        for dim in args.dims:
            print(json.dumps({f"debug model dim {dim}, ZeRO-1": save_and_load_times(dim, args.repeats, Path(root))},
                             indent=1))


if __name__ == "__main__":
    main()
