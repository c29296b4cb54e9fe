"""The evaluation tasks by name, their options, and one function that runs a list of them.

`run_tasks` is what the `eval` command and the training loop's periodic evaluation call. It runs
on every rank of an `EvalLayout`: the items of each task are generated identically everywhere,
each replica measures its strided part, and the sums are reduced (`distributed.py`), so every
rank returns the same results dict, whatever the layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from titans_train.eval import TASKS
from titans_train.eval.distributed import EvalLayout, FullLogits, all_reduce_sums
from titans_train.eval.errors import EvalOptionError
from titans_train.eval.haystack import HAYSTACKS, Haystack
from titans_train.eval.niah import DEFAULT_DEPTHS, NEEDLES
from titans_train.eval.probes import Probe, greedy_answerer, score, write_probes



@dataclass
class EvalOptions:
    tasks: list[str]
    lengths: list[int]  # tokens; for ppl the training length is always added
    seed: int = 0
    samples: int = 4  # probes per grid cell
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    needle: str = "passkey"
    haystack: str = "natural"
    segment: int = 0  # tokens per model call when streaming (0: the training length)
    batch_size: int = 8  # ppl windows per call
    bucket: int = 0  # ppl position-bucket width (0: half the training length)
    write_data: str = ""  # directory for the generated probes (JSONL per task); empty: not written


def parse_tasks(text: str | list[str]) -> list[str]:
    from titans_train.config.errors import closest

    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    if not names:
        raise EvalOptionError("--tasks", f"no task given; choose from {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            near = closest(name, TASKS)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise EvalOptionError("--tasks", f"unknown task {name!r}{hint}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def parse_lengths(text: str, seq_len: int) -> list[int]:
    """"1x,2x,4x" (multiples of the training length) and/or token counts "512,1024"."""
    lengths = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = round(float(item[:-1]) * seq_len) if item.endswith("x") else int(item)
        except ValueError:
            raise EvalOptionError("--lengths", f"{item!r} is neither a token count (512) nor a multiple of the "
                                  f"training length (4x)") from None
        if value < 1:
            raise EvalOptionError("--lengths", f"{item!r} gives {value} tokens; lengths must be >= 1")
        lengths.append(value)
    return sorted(set(lengths))


def check_options(options: EvalOptions) -> None:
    from titans_train.config.errors import check_choice
    from titans_train.errors import ConfigError

    try:
        check_choice("--needle", options.needle, NEEDLES)
        check_choice("--haystack", options.haystack, HAYSTACKS)
    except ConfigError as error:
        raise EvalOptionError(error.key, error.reason) from None
    if any(not 0.0 <= depth <= 1.0 for depth in options.depths):
        raise EvalOptionError("--depths", f"{list(options.depths)}: depths are fractions in [0, 1]")
    for name in ("samples", "batch_size"):
        if getattr(options, name) < 1:
            raise EvalOptionError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(options, name)}")


def make_probes(task: str, tokenizer, options: EvalOptions, stream: np.ndarray | None) -> list[Probe]:
    from titans_train.eval.babilong import babilong_probes
    from titans_train.eval.mqar import mqar_probes
    from titans_train.eval.niah import niah_probes

    if task == "mqar":
        return mqar_probes(tokenizer, options.lengths, options.seed, options.samples)
    haystack = Haystack.build(options.haystack, tokenizer, stream)
    if task == "niah":
        return niah_probes(tokenizer, haystack, options.lengths, options.seed, options.samples, options.depths,
                           options.needle)
    return babilong_probes(tokenizer, haystack, options.lengths, options.seed, options.samples)


def probe_scores(probes: list[Probe], answer, tokenizer, layout: EvalLayout) -> np.ndarray:
    """Score of every probe (each replica answers its strided part; the rest are reduced in)."""
    scores = torch.zeros(len(probes), dtype=torch.float64)
    for index in layout.part(len(probes)):
        scores[index] = score(probes[index], answer(probes[index], tokenizer))
    return all_reduce_sums(scores, layout).numpy()


def summarize(probes: list[Probe], scores: np.ndarray) -> dict:
    cells: dict[tuple, list[float]] = {}
    for probe, value in zip(probes, scores):
        cells.setdefault(tuple(probe.cell.items()), []).append(float(value))
    return {"accuracy": float(np.mean(scores)), "probes": len(probes),
            "cells": [{**dict(key), "accuracy": float(np.mean(values)), "probes": len(values)}
                      for key, values in cells.items()]}


def run_tasks(model, tokenizer, layout: EvalLayout, options: EvalOptions, seq_len: int,
              held_out: np.ndarray | None = None, haystack_stream: np.ndarray | None = None) -> dict:
    """Results by task name. `model`: a (possibly tp-sharded) TitansLM in eval mode;
    `held_out`: the held-out token stream (needed for ppl)."""
    from titans_train.eval.ppl import perplexity

    check_options(options)
    segment = options.segment or seq_len
    results: dict = {}
    was_training = model.training
    model.eval()
    try:
        for task in options.tasks:
            if task == "ppl":
                if held_out is None:
                    raise EvalOptionError("--tasks", "ppl needs a held-out split; pass --data DIR")
                bucket = options.bucket or max(seq_len // 2, 1)
                by_length = [perplexity(model, held_out, length, layout, segment, options.batch_size).as_dict(bucket)
                             for length in sorted({seq_len, *options.lengths})]
                at_training = next(entry for entry in by_length if entry["length"] == seq_len)
                results["ppl"] = {"loss": at_training["loss"], "ppl": at_training["ppl"], "seq_len": seq_len,
                                  "by_length": by_length}
                continue
            probes = make_probes(task, tokenizer, options, haystack_stream)
            if options.write_data and layout.is_main:
                write_probes(probes, tokenizer, os.path.join(options.write_data, f"{task}.jsonl"))
            answer = greedy_answerer(FullLogits(model, layout.context), segment)
            results[task] = summarize(probes, probe_scores(probes, answer, tokenizer, layout))
    finally:
        model.train(was_training)
    return results


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalars for the logger: eval/ppl/loss, eval/ppl/len{L}/loss, eval/niah/accuracy, ..."""
    out = {}
    for task, result in results.items():
        if task == "ppl":
            out[f"{prefix}/ppl/loss"] = result["loss"]
            out[f"{prefix}/ppl/ppl"] = result["ppl"]
            for entry in result["by_length"]:
                out[f"{prefix}/ppl/len{entry['length']}/loss"] = entry["loss"]
            continue
        out[f"{prefix}/{task}/accuracy"] = result["accuracy"]
        for cell in result["cells"]:
            name = "/".join(f"{key}{value}" for key, value in cell.items() if key not in ("accuracy", "probes"))
            out[f"{prefix}/{task}/{name}/accuracy"] = cell["accuracy"]
    return {key: value for key, value in out.items() if math.isfinite(value)}
