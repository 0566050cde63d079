"""The classification task used by two-pass adaptation (prompt-based and classification expert).

A classification prompt wraps another question: ``Q: classify: 147+8=?`` -> ``arith``. The
questions come from the training families (label = family name) and from a generator of
unrelated chat-like questions (label ``other``), in equal shares. Questions of a family are
drawn from that family's own split, so the classification splits do not overlap either.

``classify_transfer`` asks the same over the transfer families, each labelled with its training
family (``Q: classify: what is 147 plus 8?`` -> ``arith``): it is the base model's pre-training
knowledge of what a transfer question is about, and measures the routing of pass 1 on them.
"""
from __future__ import annotations

import random
from typing import Iterator

from .base import Example, ScoreResult, Task, check_split, extract_question, format_prompt, split_of
from .extract import extract_word
from .families import PARENT_FAMILY, TRAIN_FAMILIES, TRANSFER_FAMILIES, family_task

CLASSIFY_PREFIX = "classify: "
OTHER = "other"
_SYNONYMS = {"others": OTHER}

_NOUNS = ("cat", "dog", "tree", "river", "moon", "bread", "city", "song", "book", "rain", "ship",
          "lamp", "horse", "garden", "chair", "cloud", "apple", "road", "bird", "stone", "coffee",
          "winter", "forest", "robot", "castle", "ocean", "train", "candle", "mountain", "friend")
_ADJS = ("red", "quiet", "old", "happy", "tiny", "strange", "warm", "dark", "funny", "green",
         "lazy", "brave", "soft", "wild", "shiny", "sad")
_TEMPLATES = (
    "tell me about the {adj} {noun}",
    "why is the {noun} {adj}?",
    "write a poem on a {noun}",
    "describe a {adj} {noun}",
    "is a {noun} {adj}?",
    "hello! do you like the {noun}?",
    "what does a {noun} feel like?",
    "name a {adj} thing",
    "say something nice about a {noun}",
    "how do I find a {adj} {noun}?",
    "can a {noun} be {adj}?",
    "where does the {noun} go?",
    "give me a name for a {adj} {noun}",
    "what is the story of the {noun}?",
    "would a {noun} like a {noun2}?",
    "compare a {noun} and a {noun2} in words",
)


def other_question(rng: random.Random) -> str:
    """A chat-like question that belongs to none of the task families."""
    template = rng.choice(_TEMPLATES)
    noun, noun2 = rng.sample(_NOUNS, 2)
    return template.format(adj=rng.choice(_ADJS), noun=noun, noun2=noun2)


def classify_question(text: str) -> str:
    """The classification question for ``text`` (a bare question or a templated prompt)."""
    return CLASSIFY_PREFIX + extract_question(text)


def classify_prompt(text: str) -> str:
    """The full templated classification prompt for ``text`` (a bare question or a prompt of any
    family): what pass 1 of two-pass adaptation feeds the model."""
    return format_prompt(classify_question(text))


class Classification(Task):
    name = "classify"
    description = "name the family of a question, or 'other': 'classify: 147+8=?' -> 'arith'"
    #: The families whose questions are classified (each labelled with its training family).
    default_families: tuple[str, ...] = TRAIN_FAMILIES

    def __init__(self, seed: int = 1234, families: tuple[str, ...] | None = None):
        super().__init__(seed)
        self.families = tuple(families) if families is not None else self.default_families
        #: source family -> its label (a training family).
        self.label_of = {f: PARENT_FAMILY.get(f, f) for f in self.families}
        self.labels = tuple(dict.fromkeys(self.label_of.values())) + (OTHER,)

    def _source_streams(self, split: str, distinct: bool) -> dict[str, Iterator[Example]]:
        return {f: family_task(f, seed=self.seed + 1).iter_examples(split, distinct)
                for f in self.families}

    def _other_stream(self, split: str, distinct: bool) -> Iterator[str]:
        rng = random.Random(f"{OTHER}:{split}:{self.seed}")
        seen: set[str] = set()
        misses = 0
        while True:
            q = other_question(rng)
            if (distinct and q in seen) or split_of(OTHER, q) != split:
                misses += 1
                if misses > 100_000:
                    raise RuntimeError(f"ran out of distinct '{OTHER}' questions for {split}")
                continue
            misses = 0
            if distinct:
                seen.add(q)
            yield q

    def _stream(self, split: str, distinct: bool = True) -> Iterator[Example]:
        check_split(split)
        rng = random.Random(f"{self.name}:{split}:{self.seed}")
        sources = self._source_streams(split, distinct)
        others = self._other_stream(split, distinct)
        while True:
            source = rng.choice(self.families + (OTHER,))
            if source == OTHER:
                inner = next(others)
                meta = {"source_family": OTHER}
            else:
                ex = next(sources[source])
                inner = ex.question
                meta = {"source_family": source, "source_answer": ex.answer}
            yield self.make_example(CLASSIFY_PREFIX + inner, self.label_of.get(source, OTHER),
                                    meta)

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        word = extract_word(generation)
        if word is None:
            return None
        word = word.lower()
        return _SYNONYMS.get(word, word)

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None or got not in self.labels:
            return ScoreResult(correct=False, parsable=False, extracted=got)
        return ScoreResult(correct=got == example.answer, parsable=True, extracted=got)


class TransferClassification(Classification):
    name = "classify_transfer"
    description = ("name the training family of a transfer question, or 'other': "
                   "'classify: what is 147 plus 8?' -> 'arith'")
    default_families = TRANSFER_FAMILIES
