"""The study corpus (titans_train/eval/study_corpus.py): deterministic from its seed, one document per
prepared sample, every episode where it says (checked by decoding the prepared samples), and the
episodes in the eval's formats with answers that follow from the text (independent solvers)."""

import re

import numpy as np

from titans_train.data import PreparedDataset
from titans_train.data.tokenizer import ByteTokenizer
from titans_train.eval.niah import needle
from titans_train.eval.study_corpus import MQAR_LEVELS, natural_haystack_text, study_documents, write_study_corpus

SEQ_LEN = 256


def test_documents_are_deterministic_from_the_seed():
    natural = natural_haystack_text()
    first, again, other = (study_documents(seed, 24, SEQ_LEN, natural) for seed in (3, 3, 4))
    assert [d.text for d in first] == [d.text for d in again]
    assert [d.episodes for d in first] == [d.episodes for d in again]
    assert sum(a.text != b.text for a, b in zip(first, other)) > 20


def _solve_niah(text: str, question_at: int) -> str:
    """The pass key stated in the needle before the question (independent of the generator's record)."""
    keys = re.findall(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text[:question_at])
    assert len(keys) == 1, keys
    return keys[0]


def _solve_mqar(text: str, query_at: int, key: str) -> str:
    """The value of `key` among the pairs before the first query."""
    context = text[:query_at].split("  ")[0]
    pairs = dict(item.split(":") for item in context.split())
    return pairs[key]


def test_prepared_samples_hold_the_episodes_where_they_say(tmp_path):
    prepared = write_study_corpus(str(tmp_path / "corpus"), seed=5, train_documents=48, validation_documents=8,
                                  seq_len=SEQ_LEN)
    documents = study_documents(5, 48, SEQ_LEN)
    dataset = PreparedDataset(prepared["train"])
    assert len(dataset) == 48 and dataset.seq_len == SEQ_LEN
    keys, samples = dataset.read(np.arange(len(dataset)))
    tokenizer = ByteTokenizer()
    kinds, levels = set(), set()
    *_, question, _ = needle("passkey", np.random.default_rng(0))
    for key, sample in zip(keys, samples):
        document = documents[int(key)]
        assert sample[-1] == tokenizer.eos_id  # one document per sample, never cut
        text = tokenizer.decode(sample[:-1].tolist())
        assert text == document.text
        for episode in document.episodes:
            kinds.add(episode.kind)
            levels.add(episode.level)
            for span in episode.needles + episode.questions + episode.answers:
                assert text[span.offset:span.offset + len(span.text)] == span.text
            for asked, answer in zip(episode.questions, episode.answers, strict=True):
                assert answer.offset == asked.offset + len(asked.text)  # the answer follows its question
                if episode.kind == "niah":
                    assert asked.text == question  # the eval's question, word for word
                    assert answer.text == _solve_niah(text, asked.offset)
                    assert asked.offset + len(asked.text) <= SEQ_LEN - 5
                elif episode.kind == "mqar":
                    assert answer.text == _solve_mqar(text, asked.offset, asked.text.strip().rstrip(":"))
                else:
                    assert answer.text == text[:asked.offset].rsplit("\n", 1)[-1]  # the string before " = "
    assert kinds == {"niah", "mqar", "copy"} and levels == {-1, *range(len(MQAR_LEVELS))}
    validation = PreparedDataset(prepared["validation"])
    _, held_out = validation.read(np.arange(len(validation)))
    assert not {tokenizer.decode(s[:-1].tolist()) for s in held_out} & {d.text for d in documents}
