"""The study corpus: byte-level documents with embedded retrieval episodes, deterministic from a seed.

A tiny model learns retrieval at CPU scale only if the skill is in its training data, densely and in
the form the evaluation asks for. Every document is exactly `seq_len` ASCII bytes, so with the EOS
`prepare` appends it is exactly one prepared sample of seq_len + 1 tokens: an episode is never cut
by a sample boundary. Three kinds of document, drawn with probabilities 0.4, 0.4, 0.2:

- `niah`: one passkey episode in the format of the eval's probes (`niah.needle("passkey")`):
  haystack with the needle at a uniform depth, the question, the 5-digit answer, then haystack to
  the end of the document. The episode reads between the shortest probe (needle + question + one
  haystack token) and seq_len - 5 bytes before its answer, so every needle-to-question distance of
  a probe at the training length is trained. Haystack: RULER's repeated paragraph or natural text
  (the built-in corpus's *training* files, ASCII only: the eval's natural haystack reads the
  held-out files), half each.
- `mqar`: key:value pairs then queries, in the eval's mqar format (`ab:17 cd:42 ... ` then
  ` cd:42 ab:17 ...`), as many queries as fill the document. A curriculum by difficulty: level 0
  uses single-letter keys from 8 letters and 1-digit values, level 1 single letters from 26 and
  2-digit values, level 2 the eval's two-letter keys and 2-digit values; the levels are mixed in
  every batch (the prepared dataset is shuffled) so the easy ones give recall by content a gradient
  from the first steps.
- `copy`: random digit strings each written twice (`s = s`), the plainest copy task: induction
  heads form fastest on repeated random strings over a small alphabet, and they are what the
  other two kinds need.

`Document.episodes` records where each needle, pair, question and answer sits (byte offsets in the
document), so a test can check every one by decoding the prepared sample.
"""

from __future__ import annotations

import itertools
import json
import os
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from titans_train.eval.haystack import REPEATED, builtin_text
from titans_train.eval.niah import needle
from titans_train.study.collect import write_atomic

KINDS = ("niah", "mqar", "copy")
KIND_WEIGHTS = (0.4, 0.4, 0.2)
MQAR_LEVELS = (  # each level's key alphabet; its values' digits are MQAR_VALUE_DIGITS
    tuple(string.ascii_lowercase[:8]),
    tuple(string.ascii_lowercase),
    tuple("".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2)),
)
MQAR_VALUE_DIGITS = (1, 2, 2)
ANSWER_BYTES = 5  # a passkey


def validation_seed(seed: int) -> int:
    """The validation documents' seed: never the training documents'."""
    return seed + 1


@dataclass
class Span:
    """A piece of text at a byte offset of its document: what a decoding check reads back."""

    offset: int
    text: str


@dataclass
class Episode:
    kind: str  # "niah", "mqar" or "copy"
    needles: list[Span]  # the passkey sentence, the asked key:value pairs, or the strings to copy
    questions: list[Span]  # the question (niah), each query " key:" (mqar), each " = " (copy)
    answers: list[Span]  # what follows each question
    level: int = -1  # mqar curriculum level; -1 for the others


@dataclass
class Document:
    text: str  # exactly seq_len ASCII bytes
    episodes: list[Episode] = field(default_factory=list)


def natural_haystack_text() -> str:
    """The built-in corpus's training files as ASCII (one byte per character, so offsets are token offsets)."""
    return builtin_text(held_out=False).encode("ascii", "ignore").decode("ascii")


class _Haystacks:
    def __init__(self, natural: str):
        self.natural = natural

    def take(self, count: int, rng: np.random.Generator) -> str:
        """`count` bytes of the repeated paragraph (from 0) or natural text (from a random offset), wrapping."""
        if count <= 0:
            return ""
        source = REPEATED if rng.random() < 0.5 else self.natural
        start = 0 if source is REPEATED else int(rng.integers(len(source)))
        repeats = (start + count) // len(source) + 1
        return (source * repeats)[start:start + count]


def niah_document(seq_len: int, rng: np.random.Generator, haystacks: _Haystacks) -> Document:
    text, question, answer = needle("passkey", rng)
    shortest = len(text) + len(question) + 1
    longest = seq_len - ANSWER_BYTES
    if longest < shortest:
        raise ValueError(f"seq_len {seq_len} is below the {shortest + ANSWER_BYTES} bytes of a passkey episode")
    length = int(rng.integers(shortest, longest + 1))  # bytes read before the answer
    hay = haystacks.take(length - len(text) - len(question), rng)
    at = int(rng.integers(0, len(hay) + 1))
    body = hay[:at] + text + hay[at:] + question
    document = body + answer + haystacks.take(seq_len - len(body) - len(answer), rng)
    episode = Episode("niah", [Span(at, text)], [Span(len(body) - len(question), question)], [Span(len(body), answer)])
    return Document(document, [episode])


def mqar_document(seq_len: int, rng: np.random.Generator) -> Document:
    level = int(rng.integers(len(MQAR_LEVELS)))
    alphabet, digits = MQAR_LEVELS[level], MQAR_VALUE_DIGITS[level]
    keys = [alphabet[i] for i in rng.permutation(len(alphabet))]
    query_bytes = len(f" {keys[0]}:") + digits
    pairs_wanted = int(rng.integers(2, len(keys) + 1))
    pairs, context = [], ""
    for key in keys[:pairs_wanted]:
        item = f"{key}:{int(rng.integers(10 ** digits)):0{digits}d} "
        # Keep room for at least as many queries as half the pairs (and one).
        if len(context) + len(item) + (len(pairs) // 2 + 2) * query_bytes > seq_len:
            break
        pairs.append(Span(len(context), item))
        context += item
    needles, questions, answers = [], [], []
    text = context
    while len(text) + query_bytes <= seq_len:
        pair = pairs[int(rng.integers(len(pairs)))]
        key, value = pair.text.strip().split(":")
        query = f" {key}:"
        needles.append(pair)
        questions.append(Span(len(text), query))
        answers.append(Span(len(text) + len(query), value))
        text += query + value
    text += "." * (seq_len - len(text))  # filler: fewer bytes than one more query
    return Document(text, [Episode("mqar", needles, questions, answers, level)])


def copy_document(seq_len: int, rng: np.random.Generator) -> Document:
    text, needles, questions, answers = "", [], [], []
    while True:
        value = "".join(str(d) for d in rng.integers(10, size=int(rng.integers(4, 33))))
        if len(text) + 2 * len(value) + 4 > seq_len:
            break
        needles.append(Span(len(text), value))
        questions.append(Span(len(text) + len(value), " = "))
        answers.append(Span(len(text) + len(value) + 3, value))
        text += f"{value} = {value}\n"
    text += "." * (seq_len - len(text))
    return Document(text, [Episode("copy", needles, questions, answers)])


def study_documents(seed: int, count: int, seq_len: int, natural: str | None = None) -> list[Document]:
    """`count` documents of `seq_len` bytes; document i depends on (seed, i) alone."""
    haystacks = _Haystacks(natural_haystack_text() if natural is None else natural)
    documents = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
        if kind == "niah":
            document = niah_document(seq_len, rng, haystacks)
        else:
            document = mqar_document(seq_len, rng) if kind == "mqar" else copy_document(seq_len, rng)
        assert len(document.text.encode("ascii")) == seq_len, "a study document must be exactly seq_len bytes"
        documents.append(document)
    return documents


def write_study_corpus(directory: str, seed: int, train_documents: int, validation_documents: int,
                       seq_len: int, natural: str | None = None, workers: int = 1) -> dict[str, str]:
    """Writes `<directory>/train` and `<directory>/validation` (prepared datasets, byte tokenizer),
    beside them each split's documents (`{split}.jsonl`, the prepare input) and the validation
    episodes (`validation.episodes.jsonl`: kind, needles, questions, answers with their offsets).
    Returns {split: prepared dir}.

    The validation documents are drawn from `validation_seed(seed)` (never the training ones). A split that is
    already prepared with the same settings is kept: preparation is deterministic.
    """
    from titans_train.data.prepare import prepare_dataset

    os.makedirs(directory, exist_ok=True)
    natural = natural_haystack_text() if natural is None else natural
    settings = {"seed": seed, "train_documents": train_documents, "validation_documents": validation_documents,
                "seq_len": seq_len, "natural_chars": len(natural)}
    settings_path = os.path.join(directory, "corpus.json")
    prepared = {split: os.path.join(directory, split) for split in ("train", "validation")}
    if os.path.exists(settings_path) and all(os.path.exists(os.path.join(path, "manifest.json")) for path in prepared.values()):
        with open(settings_path) as handle:
            if json.load(handle) == settings:
                return prepared
    for split, split_seed, count in (("train", seed, train_documents), ("validation", validation_seed(seed), validation_documents)):
        documents = study_documents(split_seed, count, seq_len, natural)
        source = os.path.join(directory, f"{split}.jsonl")
        write_atomic(Path(source), "".join(json.dumps({"text": d.text}) + "\n" for d in documents))
        if split == "validation":  # the training split's would be ~2 KB a document; study_documents regenerates it
            write_atomic(Path(directory, "validation.episodes.jsonl"),
                         "".join(json.dumps([asdict(e) for e in d.episodes]) + "\n" for d in documents))
        # seed: the sample shuffle of prepare; the documents are already one sample each.
        prepare_dataset([source], prepared[split], "byte", seq_len, seed=split_seed, num_workers=workers,
                        overwrite=True, progress=False)
    write_atomic(Path(settings_path), json.dumps(settings))
    return prepared
