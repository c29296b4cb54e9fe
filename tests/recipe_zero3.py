"""A recipe built as the trainer builds it under ZeRO-3, on one rank of a multi-process launch,
then (optionally) trained for a few optimizer steps, with this rank's memory measured by phase.

Used by tests/test_scale_1b.py and benchmarks/construction.py. Memory is resident memory
(VmRSS), sampled by a thread every `SAMPLE_S` seconds and attributed to the phase running at the
time; `peak` is the kernel's own high-water mark (VmHWM), which no sample can miss.

A >= 1B model on 4 processes uses most of a 24 GB machine, so every rank also stops itself
(exit code `OUT_OF_MEMORY_EXIT`, one line on stderr) when the machine's available memory falls
below `guard_bytes`: a clear failure instead of the kernel's OOM killer taking some process,
perhaps another job's.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

import torch

SAMPLE_S = 0.05
OUT_OF_MEMORY_EXIT = 86


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    return _status_bytes("VmHWM")


def available_bytes() -> int:
    """The machine's MemAvailable (what can be allocated without swapping or OOM)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PhaseMemory:
    """Peak VmRSS of this process per named phase, and the machine's lowest MemAvailable."""

    def __init__(self, guard_bytes: int = 0, report: bool = False):
        self.peaks: dict[str, int] = {}
        self._report = report
        self.lowest_available = available_bytes()
        self._phase = "other"  # outside every named phase
        self._guard = guard_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._record()

    def _record(self) -> None:
        rss, available = _status_bytes("VmRSS"), available_bytes()
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), rss)
        self.lowest_available = min(self.lowest_available, available)
        if available < self._guard:
            print(f"rank {os.environ.get('RANK')}: the machine's available memory fell to {available / 2**30:.2f} GiB "
                  f"(guard {self._guard / 2**30:.2f} GiB) in phase {self._phase!r} at {rss / 2**30:.2f} GiB resident: "
                  "stopped before the OOM killer; run it on a machine with more free memory",
                  file=sys.stderr, flush=True)
            os._exit(OUT_OF_MEMORY_EXIT)

    @contextmanager
    def phase(self, name: str):
        self._record()
        outer, self._phase = self._phase, name
        try:
            yield
        finally:
            self._record()
            self._phase = outer
            if self._report:
                print(f"rank {os.environ.get('RANK')}: {name} peak {self.peaks[name] / 2**30:.2f} GiB, now "
                      f"{_status_bytes('VmRSS') / 2**30:.2f} GiB; "
                      f"machine available {available_bytes() / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_tensors_to_the_os(threshold_bytes: int = 2**20) -> None:
    """Make glibc give every allocation of `threshold_bytes` or more its own mapping, returned to
    the OS when the tensor is freed. By default glibc raises that threshold to the largest block
    freed so far (up to 32 MiB) and keeps smaller freed tensors in its heap, which then counts
    in RSS: ~1 GiB per rank in a 1.3B ZeRO-3 engine's set-up (docs/scaling.md), memory the
    process could reuse but that says nothing about what ZeRO holds."""
    import ctypes

    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold_bytes):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


def initial_distributions_for(config) -> dict:
    from titans_train.config import model_config
    from titans_train.model import TitansLM
    from titans_train.model.init import initial_distributions

    with torch.device("meta"):
        return initial_distributions(TitansLM(model_config(config)))


SAMPLED_ELEMENTS = 64


def _partition_samples(parameters) -> list[torch.Tensor]:
    """The first elements of this rank's partition of every parameter, in fp32: enough to see
    the optimizer move each of them without a copy of the partitions."""
    return [p.ds_tensor.detach()[:SAMPLED_ELEMENTS].to(torch.float32, copy=True) for p in parameters]


def build_recipe_zero3(recipe: str, overrides: list[str], steps: int = 0, guard_bytes: int = 0,
                       report: bool = False, mmap_threshold: int = 0) -> dict:
    """Build `recipe` on this rank as the trainer does under ZeRO-3 (in its precision), then
    take `steps` optimizer steps on random tokens through the trainer's engine.

    Returns the build's numbers (elements, dtype, time, whether the partition holds the seeded
    rule's values), peak resident memory before and after the build (VmHWM) and, with steps, per
    step its loss and time, the parameters whose partition samples it left unchanged, the peak after
    the steps, and peak VmRSS per phase (build, engine, forward, backward,
    optimizer: DeepSpeed's step). `mmap_threshold` > 0: `return_freed_tensors_to_the_os` first;
    `guard_bytes`, `report`: `PhaseMemory`'s..
    """
    from titans_train.config import batch_plan, load_recipe, model_config
    from titans_train.model import no_weight_decay
    from titans_train.model.init import SeededTensor
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.construction import build_parallel_model
    from titans_train.parallel.parallelize import ParallelObjective
    from titans_train.train.distributed import init_distributed
    from titans_train.train.engine import build_engine, deepspeed_config

    if mmap_threshold:
        return_freed_tensors_to_the_os(mmap_threshold)
    memory = PhaseMemory(guard_bytes, report)
    world = int(os.environ["WORLD_SIZE"])
    config = load_recipe(recipe, [*overrides, "parallel.zero_stage=3"], world_size=world)
    batch = batch_plan(config, world)
    init_distributed("gloo")
    context = ParallelContext.initialize(tp=config.parallel.tp, sp=config.parallel.sp)
    before = peak_rss_bytes()
    began = time.perf_counter()
    with memory.phase("build"):
        model, plan = build_parallel_model(model_config(config), config.parallel, context, seed=config.train.seed,
                                           zero3_config=deepspeed_config(config, batch, context),
                                           precision=config.train.precision)
    seconds = time.perf_counter() - began
    parameters = list(model.parameters())
    partition = parameters[0].ds_tensor  # the embedding: its first elements, drawn by the rule
    start = partition.ds_numel * torch.distributed.get_rank()
    distribution = initial_distributions_for(config)["embedding.weight"]
    expected = SeededTensor(distribution, config.train.seed, "embedding.weight",
                            parameters[0].ds_numel).span(start, start + 8)
    result = dict(parameters=sum(p.ds_numel for p in parameters),
                  local_elements=sum(p.ds_tensor.numel() for p in parameters),
                  dtype=str(partition.dtype), before=before, peak=peak_rss_bytes(), seconds=seconds,
                  first_elements_match=torch.equal(partition[:8], expected.to(partition.dtype)))
    if steps:
        with memory.phase("engine"):
            engine, _, _ = build_engine(ParallelObjective(model, plan), config, batch, context,
                                        no_weight_decay=lambda name, p: no_weight_decay(name.removeprefix("model."), p))
        result.update(steps_of(engine, plan, config, batch, context, steps, memory, list(model.named_parameters())))
        result["peak_after_steps"] = peak_rss_bytes()
        engine.destroy()
    result.update(phase_peaks=memory.stop(), lowest_available=memory.lowest_available)
    ParallelContext.destroy()
    return result


def _in_phase(memory: PhaseMemory, phase: str, method):
    def measured(*args, **kwargs):
        with memory.phase(phase):
            return method(*args, **kwargs)

    return measured


def steps_of(engine, plan, config, batch, context, steps: int, memory: PhaseMemory, named_parameters) -> dict:
    """`steps` optimizer steps on random tokens (the same on every rank of a replica), split as
    the trainer splits them (`parallel.zero.optimizer_step`), timed and memory-sampled."""
    from titans_train.parallel.zero import optimizer_step

    names, parameters = zip(*named_parameters)
    generator = torch.Generator().manual_seed(context.data_rank)
    shape = (config.train.micro_batch_size, config.train.seq_len + 1)
    step_seconds, losses, unchanged = [], [], []
    for name in ("forward", "backward", "step"):  # the engine's own methods, measured by phase
        setattr(engine, name, _in_phase(memory, "optimizer" if name == "step" else name, getattr(engine, name)))
    for _ in range(steps):
        before = _partition_samples(parameters)
        began = time.perf_counter()
        micro_batches = [torch.randint(0, config.model.vocab_size, shape, generator=generator)
                         for _ in range(batch.gradient_accumulation_steps)]
        with memory.phase("train step"):
            losses.append(optimizer_step(engine, plan, micro_batches).loss)
        step_seconds.append(time.perf_counter() - began)
        after = _partition_samples(parameters)
        # parameters whose sampled elements all stayed put (an empty partition counts as moved)
        unchanged.append([name for name, a, b in zip(names, after, before) if b.numel() and torch.equal(a, b)])
    for name in ("forward", "backward", "step"):
        delattr(engine, name)
    return dict(step_seconds=step_seconds, losses=losses, unchanged_parameters=unchanged)
