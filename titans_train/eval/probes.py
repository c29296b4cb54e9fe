"""A retrieval probe (one generated test item), how a model answers it, and how it is scored.

A probe is a context (token ids: haystack with needles or facts inside) followed by one or more
turns, each a query and the answer expected. The model reads the context in segments with its
state carried, then for each turn greedily generates as many tokens as the answer has, with live
memory (`titans_train.generate.generate` from the carried state). The next turn continues from the
state after the query and the *expected* answer (teacher forcing), so a wrong answer does not
poison later queries. Score of a probe: the fraction of its turns answered exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from titans_train.eval.errors import EvalOptionError

Answerer = Callable[["Probe", object], list[str]]  # (probe, tokenizer) -> one generated text per turn


@dataclass
class Probe:
    task: str
    context_ids: list[int]
    turns: list[tuple[list[int], str]]  # (query token ids, expected answer text)
    cell: dict  # where it is reported: {"length": ..., "depth": ...} or other grid keys
    needles: list[tuple[int, str]] = field(default_factory=list)  # (offset in context_ids, text)

    @property
    def length(self) -> int:
        """Tokens the model reads before its first answer."""
        return len(self.context_ids) + len(self.turns[0][0])

    def as_dict(self, tokenizer) -> dict:
        return {"task": self.task, "cell": self.cell, "context": tokenizer.decode(self.context_ids),
                "turns": [{"query": tokenizer.decode(query), "answer": answer} for query, answer in self.turns],
                "needles": [{"offset": offset, "text": text} for offset, text in self.needles]}


def check_fits(length: int, needed: int, what: str) -> None:
    if length < needed:
        raise EvalOptionError("--lengths", f"{length} tokens is below the {needed} tokens of the {what}; "
                              f"use lengths >= {needed}")


def score(probe: Probe, generated: list[str]) -> float:
    """Fraction of turns whose generated text equals the expected answer (surrounding spaces ignored)."""
    right = sum(text.strip() == answer.strip() for text, (_, answer) in zip(generated, probe.turns, strict=True))
    return right / len(probe.turns)


@torch.no_grad()
def read(model, ids: list[int], segment: int, state=None):
    """Read `ids` in calls of `segment` tokens, state carried; returns the state after them."""
    device = next(model.parameters()).device
    for start in range(0, len(ids), segment):
        state = model(torch.tensor([ids[start:start + segment]], device=device), state=state).state
    return state


def greedy_answerer(model, segment: int) -> Answerer:
    """Answers with `model` (one process's view: full logits, see `distributed.FullLogits`)."""
    from titans_train.generate import generate

    def answer(probe: Probe, tokenizer) -> list[str]:
        state = read(model, probe.context_ids, segment)
        texts = []
        for query, expected in probe.turns:
            expected_ids = tokenizer.encode(expected)
            generated = generate(model, query, len(expected_ids), temperature=0.0, top_k=0,
                                 stop_id=getattr(tokenizer, "eos_id", None), state=state)
            texts.append(tokenizer.decode(generated))
            state = read(model, query + expected_ids, segment, state)
        return texts

    return answer


def write_probes(probes: list[Probe], tokenizer, path: str) -> None:
    """One JSON object per line, decoded, written under a temporary name and renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        for probe in probes:
            handle.write(json.dumps(probe.as_dict(tokenizer)) + "\n")
    os.replace(temporary, path)
