"""`babilong`: bAbI-style facts hidden in long natural text, then a question (BABILong's design).

Task types, as in bAbI:
- `qa1` (single supporting fact): people move between places; "Where is Mary?" is answered by
  the last fact about Mary;
- `qa2` (two supporting facts): someone picks up an object, then moves; "Where is the apple?"
  needs both facts.
The facts are spread over the haystack in story order at positions drawn from the seed; a probe
of length L reads L tokens (haystack + facts + question) before answering with one word.
"""

from __future__ import annotations

import numpy as np

from titans_train.eval.haystack import Haystack
from titans_train.eval.probes import Probe, check_fits

QA_TASKS = ("qa1", "qa2")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVES = ("went to", "moved to", "travelled to", "journeyed to")
N_MOVES = 4  # plus, at most, two facts that make the question answerable


def minimum_length(tokenizer) -> int:
    """Tokens the longest possible story and question take: shorter lengths are refused, whatever
    the seed (so a length that works for one seed works for every seed)."""
    fact = max(len(tokenizer.encode(f" {who} {verb} the {what}. ")) for who in PEOPLE
               for verb in (*MOVES, "picked up") for what in (*PLACES, *OBJECTS))
    question = max(len(tokenizer.encode(f"\nQuestion: Where is {what}? Answer: "))
                   for what in (*PEOPLE, *(f"the {thing}" for thing in OBJECTS)))
    return (N_MOVES + 2) * fact + question + 1


def _move(person: str, rng) -> tuple[str, str]:
    place = PLACES[int(rng.integers(len(PLACES)))]
    return f"{person} {MOVES[int(rng.integers(len(MOVES)))]} the {place}.", place


def story(task: str, rng: np.random.Generator, n_moves: int = N_MOVES) -> tuple[list[str], str, str]:
    """(facts in order, question, answer)."""
    facts, where = [], {}
    for _ in range(n_moves):
        person = PEOPLE[int(rng.integers(len(PEOPLE)))]
        fact, where[person] = _move(person, rng)
        facts.append(fact)
    person = PEOPLE[int(rng.integers(len(PEOPLE)))]
    if task == "qa1":
        if person not in where:
            fact, where[person] = _move(person, rng)
            facts.insert(int(rng.integers(len(facts) + 1)), fact)
        return facts, f"\nQuestion: Where is {person}? Answer: ", where[person]
    thing = OBJECTS[int(rng.integers(len(OBJECTS)))]
    pickup = int(rng.integers(len(facts) + 1))
    facts.insert(pickup, f"{person} picked up the {thing}.")
    fact, place = _move(person, rng)  # after the pickup, and the last fact about the person
    later = [i for i in range(pickup + 1, len(facts) + 1)
             if all(not f.startswith(person) for f in facts[i:])]
    facts.insert(later[int(rng.integers(len(later)))], fact)
    return facts, f"\nQuestion: Where is the {thing}? Answer: ", place


def babilong_probes(tokenizer, haystack: Haystack, lengths: list[int], seed: int, samples: int = 4,
                    tasks: tuple[str, ...] = QA_TASKS) -> list[Probe]:
    probes = []
    needed = minimum_length(tokenizer)
    for length in lengths:
        check_fits(length, needed, "longest story and question")
        for task_index, task in enumerate(tasks):
            for index in range(samples):
                rng = np.random.default_rng([seed, length, task_index, index])
                facts, question, answer = story(task, rng)
                fact_ids = [tokenizer.encode(f" {fact} ") for fact in facts]
                question_ids = tokenizer.encode(question)
                hay = haystack.take(length - sum(map(len, fact_ids)) - len(question_ids), rng)
                cuts = np.sort(rng.integers(0, len(hay) + 1, len(facts))).tolist()
                context, needles, previous = [], [], 0
                for cut, ids, fact in zip(cuts, fact_ids, facts):
                    context += hay[previous:cut]
                    needles.append((len(context), f" {fact} "))
                    context += ids
                    previous = cut
                context += hay[previous:]
                probes.append(Probe("babilong", context, [(question_ids, answer)],
                                    {"length": length, "qa": task}, needles))
    return probes
