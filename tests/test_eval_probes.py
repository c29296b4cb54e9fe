"""The retrieval generators (niah, babilong, mqar): deterministic from their seed, the needle where
the probe says (checked by decoding), the answer implied by the text, and scored by exact match
(an oracle that answers right scores 1.0, a wrong one 0.0); greedy answers with live memory equal
greedy decoding that rereads the whole text."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from titans_train.data import load_tokenizer
from titans_train.eval.babilong import babilong_probes
from titans_train.eval.errors import EvalOptionError
from titans_train.eval.haystack import Haystack
from titans_train.eval.mqar import mqar_probes
from titans_train.eval.niah import NEEDLES, niah_probes

TOKENIZER = load_tokenizer("byte")
LENGTHS = [300, 400]


@pytest.fixture(scope="module")
def haystacks():
    natural_stream = np.asarray(TOKENIZER.encode("def f(x):\n    return x + 1\n" * 40))
    return {"repeat": Haystack.build("repeat", TOKENIZER),
            "natural-builtin": Haystack.build("natural", TOKENIZER),
            "natural-stream": Haystack.build("natural", TOKENIZER, natural_stream)}


def _all_probes(haystacks, seed: int) -> dict:
    out = {}
    for name, haystack in haystacks.items():
        for kind in NEEDLES:
            out[f"niah-{kind}-{name}"] = niah_probes(TOKENIZER, haystack, LENGTHS, seed, samples=2, kind=kind)
        out[f"babilong-{name}"] = babilong_probes(TOKENIZER, haystack, LENGTHS, seed, samples=3)
    out["mqar"] = mqar_probes(TOKENIZER, LENGTHS, seed, samples=3)
    return out


def _as_tuple(probe):
    return probe.context_ids, probe.turns, probe.cell, probe.needles


def test_generators_are_deterministic_from_their_seed(haystacks):
    first, again, other = (_all_probes(haystacks, seed) for seed in (3, 3, 4))
    for name in first:
        assert [_as_tuple(p) for p in first[name]] == [_as_tuple(p) for p in again[name]], name
        assert [_as_tuple(p) for p in first[name]] != [_as_tuple(p) for p in other[name]], name


def test_needles_are_where_the_probe_says_and_lengths_are_exact(haystacks):
    for name, probes in _all_probes(haystacks, 0).items():
        for probe in probes:
            for offset, text in probe.needles:
                ids = TOKENIZER.encode(text)
                assert TOKENIZER.decode(probe.context_ids[offset:offset + len(ids)]) == text, (name, offset)
            if name.startswith("niah"):
                (offset, _), = probe.needles
                haystack_tokens = len(probe.context_ids) - len(TOKENIZER.encode(probe.needles[0][1]))
                assert offset == round(probe.cell["depth"] * haystack_tokens)
                assert probe.turns[0][1] in probe.needles[0][1]  # the needle holds the answer
            if not name.startswith("mqar"):
                assert probe.length == probe.cell["length"], name
            else:
                assert probe.length <= probe.cell["length"], name


def _solve_babi(context: str, question: str) -> str:
    """Answer from the decoded text alone: follow the people, and whoever picked up the thing."""
    where, holder = {}, {}
    for person, verb, thing in re.findall(r"(Mary|John|Daniel|Sandra) (went to|moved to|travelled to|journeyed to|"
                                          r"picked up) the (\w+)\.", context):
        if verb == "picked up":
            holder[thing] = person
        else:
            where[person] = thing
    asked = re.search(r"Where is (?:the )?(\w+)\?", question).group(1)
    return where[holder[asked]] if asked in holder else where[asked]


def test_babilong_answers_follow_from_the_facts_in_the_text(haystacks):
    probes = babilong_probes(TOKENIZER, haystacks["repeat"], LENGTHS, seed=5, samples=6)
    assert {p.cell["qa"] for p in probes} == {"qa1", "qa2"}
    for probe in probes:
        (query, answer), = probe.turns
        assert _solve_babi(TOKENIZER.decode(probe.context_ids), TOKENIZER.decode(query)) == answer


def test_mqar_answers_are_the_values_of_the_queried_keys():
    for probe in mqar_probes(TOKENIZER, LENGTHS, seed=2, samples=3):
        pairs = dict(re.findall(r"([a-z]{2}):(\d{2}) ", TOKENIZER.decode(probe.context_ids)))
        assert len(pairs) * 6 == len(probe.context_ids)  # every key distinct
        for query, answer in probe.turns:
            assert pairs[TOKENIZER.decode(query).strip(" :")] == answer


def test_an_oracle_scores_one_and_a_wrong_answerer_zero(haystacks):
    from titans_train.eval.distributed import EvalLayout
    from titans_train.eval.tasks import probe_scores, summarize
    from titans_train.parallel import ParallelContext

    layout = EvalLayout.from_context(ParallelContext.initialize())
    for name, probes in _all_probes(haystacks, 1).items():
        def oracle(probe, tokenizer):
            return [answer for _, answer in probe.turns]

        def wrong(probe, tokenizer):
            return [answer[::-1] + "x" for _, answer in probe.turns]

        assert summarize(probes, probe_scores(probes, oracle, TOKENIZER, layout))["accuracy"] == 1.0, name
        summary = summarize(probes, probe_scores(probes, wrong, TOKENIZER, layout))
        assert summary["accuracy"] == 0.0 and all(cell["accuracy"] == 0.0 for cell in summary["cells"]), name


def test_a_length_below_the_needle_is_refused_naming_the_option(haystacks):
    for make in (lambda: niah_probes(TOKENIZER, haystacks["repeat"], [60], 0),
                 lambda: babilong_probes(TOKENIZER, haystacks["repeat"], [60], 0),
                 lambda: mqar_probes(TOKENIZER, [30], 0)):
        with pytest.raises(EvalOptionError, match=r"^--lengths: "):
            make()


def test_greedy_answers_with_carried_state_equal_greedy_decoding_that_rereads_everything():
    from titans_train.config import load_recipe, model_config
    from titans_train.eval.probes import greedy_answerer
    from titans_train.model import TitansLM

    torch.manual_seed(0)
    model = TitansLM(model_config(load_recipe("debug"))).eval()
    (probe,) = mqar_probes(TOKENIZER, [60], seed=0, samples=1, queries=2)
    answers = greedy_answerer(model, segment=16)(probe, TOKENIZER)  # context read in 3 segments
    prefix = list(probe.context_ids)
    with torch.no_grad():
        for (query, expected), answer in zip(probe.turns, answers, strict=True):
            tokens = prefix + query
            generated = []
            for _ in range(len(TOKENIZER.encode(expected))):
                generated.append(int(model(torch.tensor([tokens + generated])).logits[0, -1].argmax()))
            assert TOKENIZER.decode(generated) == answer
            prefix = tokens + TOKENIZER.encode(expected)  # the next query follows the expected answer
