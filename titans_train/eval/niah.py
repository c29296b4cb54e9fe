"""`niah`: single needle in a haystack, in the style of RULER's S-NIAH.

One needle (a key and its value) is hidden at a depth of a haystack; the question after the
haystack asks for the value. Needle kinds: `passkey` (RULER's S-NIAH-1: a 5-digit pass key),
`number` (a 7-digit number for a word key), `uuid`, `word`. A probe of length L reads exactly L
tokens before answering: haystack + needle + question. The needle starts at token
round(depth x haystack tokens) of the context (depth 0: first, 1: right before the question).
"""

from __future__ import annotations

import uuid

import numpy as np

from titans_train.eval.haystack import Haystack
from titans_train.eval.probes import Probe, check_fits

NEEDLES = ("passkey", "number", "uuid", "word")
WORDS = ("apple", "river", "candle", "marble", "forest", "pepper", "violin", "harbor", "lantern", "meadow",
         "copper", "falcon", "garden", "island", "jacket", "kettle", "lemon", "mirror", "needle", "orange",
         "pillow", "quartz", "rocket", "saddle", "tunnel", "velvet", "walnut", "yellow", "zephyr", "anchor",
         "barrel", "cactus")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle(kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(needle sentence, question, answer) of one needle."""
    if kind == "passkey":
        value = str(int(rng.integers(10000, 100000)))
        return (f" The pass key is {value}. Remember it. {value} is the pass key. ",
                "\nWhat is the pass key? The pass key is ", value)
    key = WORDS[int(rng.integers(len(WORDS)))]
    if kind == "number":
        value, noun = str(int(rng.integers(1000000, 10000000))), "number"
    elif kind == "uuid":
        value, noun = str(uuid.UUID(bytes=rng.bytes(16), version=4)), "uuid"
    else:
        value, noun = WORDS[int(rng.integers(len(WORDS)))], "word"
    return (f" One of the special magic {noun}s for {key} is: {value}. ",
            f"\nWhat is the special magic {noun} for {key}? The special magic {noun} for {key} is: ", value)


def niah_probes(tokenizer, haystack: Haystack, lengths: list[int], seed: int, samples: int = 4,
                depths: tuple[float, ...] = DEFAULT_DEPTHS, kind: str = "passkey") -> list[Probe]:
    probes = []
    for length in lengths:
        for depth in depths:
            for index in range(samples):
                rng = np.random.default_rng([seed, length, round(depth * 1000), index])
                text, question, answer = needle(kind, rng)
                needle_ids, question_ids = tokenizer.encode(text), tokenizer.encode(question)
                check_fits(length, len(needle_ids) + len(question_ids) + 1, f"{kind} needle and its question")
                hay = haystack.take(length - len(needle_ids) - len(question_ids), rng)
                at = round(depth * len(hay))
                probes.append(Probe("niah", hay[:at] + needle_ids + hay[at:], [(question_ids, answer)],
                                    {"length": length, "depth": depth}, [(at, text)]))
    return probes
