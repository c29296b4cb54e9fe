"""`mqar`: multi-query associative recall (Zoology's MQAR, the recall test for linear-memory models).

The context lists key:value pairs (two-letter keys, two-digit values, all keys distinct); then
`queries` of the keys are asked in turn (" key:" -> "value"), each answered greedily, the
expected value fed back before the next query. A probe of length L holds as many pairs as fit
in about L tokens; its score is the fraction of queries answered exactly.
"""

from __future__ import annotations

import itertools
import string

import numpy as np

from titans_train.eval.probes import Probe, check_fits

KEYS = tuple("".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2))


def mqar_probes(tokenizer, lengths: list[int], seed: int, samples: int = 4, queries: int = 4) -> list[Probe]:
    probes = []
    query_budget = queries * len(tokenizer.encode(" zz:99"))
    for length in lengths:
        for index in range(samples):
            check_fits(length, queries * len(tokenizer.encode("zz:99 ")) + query_budget,
                       f"{queries} mqar pairs and queries")
            rng = np.random.default_rng([seed, length, index])
            keys = [KEYS[i] for i in rng.permutation(len(KEYS))]
            pairs, context = [], []
            for key in keys:
                value = f"{int(rng.integers(100)):02d}"
                ids = tokenizer.encode(f"{key}:{value} ")
                if len(context) + len(ids) + query_budget > length:
                    break
                pairs.append((key, value, len(context)))
                context += ids
            asked = [pairs[i] for i in rng.choice(len(pairs), queries, replace=False)]
            turns = [(tokenizer.encode(f" {key}:"), value) for key, value, _ in asked]
            needles = [(offset, f"{key}:{value} ") for key, value, offset in asked]
            probes.append(Probe("mqar", context, turns, {"length": length}, needles))
    return probes
