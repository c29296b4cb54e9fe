"""One logger for a run: console progress line, `metrics.jsonl`, and wandb.

Only the rank that owns logging (global rank 0) writes; other ranks get a logger whose methods
do nothing, so the loop never branches on rank. wandb defaults to offline mode (a local run
directory, no network); `logging.wandb_mode=online` syncs, `disabled` writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_tokens(count: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count:.0f}"


class RunLogger:
    def __init__(self, config: DictConfig, enabled: bool, resolved_config: dict[str, Any]):
        self.enabled = enabled
        self.run_dir = Path(config.run_dir)
        self._wandb_run = None
        self._metrics_file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if config.logging.wandb_mode != "disabled":
            self._wandb_run = self._start_wandb(config, resolved_config)

    def _start_wandb(self, config: DictConfig, resolved_config: dict[str, Any]):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(
            project=config.logging.wandb_project,
            name=config.logging.wandb_name,
            group=config.logging.wandb_group or None,
            dir=str(self.run_dir),
            mode=config.logging.wandb_mode,
            config=resolved_config,
            resume="allow",
            id=_stable_run_id(self.run_dir),
        )

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def warning(self, message: str) -> None:
        if self.enabled:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """One record in metrics.jsonl and wandb; `values` keys are slash-namespaced."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self._metrics_file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _stable_run_id(run_dir: Path) -> str:
    """The same wandb run id across resumes of one run directory."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    temporary = id_file.with_suffix(".tmp")
    temporary.write_text(run_id)
    os.replace(temporary, id_file)
    return run_id


class ProgressMeter:
    """Throughput, ETA and MFU over the steps since the last report."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._last_time = time.perf_counter()
        self._last_step: int | None = None

    def start(self, step: int) -> None:
        self._last_time = time.perf_counter()
        self._last_step = step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - (self._last_step if self._last_step is not None else step - 1)
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        tokens_per_second = steps * self.tokens_per_step / elapsed
        result = {
            "throughput/tokens_per_second": tokens_per_second,
            "throughput/seconds_per_step": elapsed / max(steps, 1),
            "throughput/eta_seconds": (self.total_steps - step) * elapsed / max(steps, 1),
        }
        if self.peak_flops > 0 and self.flops_per_token > 0:
            result["throughput/mfu"] = tokens_per_second * self.flops_per_token / self.peak_flops
        return result


def progress_line(step: int, total_steps: int, tokens_seen: int, loss: float, lr: float, grad_norm: float | None,
                  speed: dict[str, float]) -> str:
    width = len(str(total_steps))
    parts = [
        f"step {step:>{width}}/{total_steps}",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
    ]
    if grad_norm is not None:
        parts.append(f"gnorm {grad_norm:.2f}")
    parts += [
        f"tok {format_tokens(tokens_seen)}",
        f"{format_tokens(speed['throughput/tokens_per_second'])} tok/s",
    ]
    if "throughput/mfu" in speed:
        parts.append(f"MFU {100 * speed['throughput/mfu']:.2f}%")
    parts.append(f"ETA {format_duration(speed['throughput/eta_seconds'])}")
    return " | ".join(parts)
