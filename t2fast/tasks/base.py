"""Core types of the bundled task world: examples, scores, the prompt template and splits.

A task family is a deterministic generator of questions with exactly checkable short answers.
Every question is assigned to one split (train / validation / test) by a hash of the family
name and the question text, so splits never overlap and do not depend on how many examples
are asked for. ``Task.examples(split, n)`` walks a seeded generator and keeps the questions
that hash into ``split``; the first ``n`` examples are a prefix of the first ``n + k``.

The same scorer code is used for RL rewards and for evaluation.
"""
from __future__ import annotations

import hashlib
import random
from itertools import islice
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

#: The fixed chat-like template the tiny model is trained on. The prompt ends where the
#: answer begins; the model answers with a short string followed by its end-of-sequence token.
PROMPT_TEMPLATE = "Q: {question}\nA: "
QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "\nA: "

SPLITS = ("train", "validation", "test")
#: Share of the question space (in hash buckets out of 100) given to each split.
SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
#: Number of examples returned by ``Task.examples(split)`` when ``n`` is None.
DEFAULT_SIZES = {"train": 4096, "validation": 256, "test": 512}
DEFAULT_SEED = 1234


def format_prompt(question: str) -> str:
    """Wrap a bare question in the prompt template."""
    return PROMPT_TEMPLATE.format(question=question)


def extract_question(prompt: str) -> str:
    """Inverse of :func:`format_prompt`; a text not in the template is returned stripped."""
    text = prompt
    if text.startswith(QUESTION_PREFIX):
        text = text[len(QUESTION_PREFIX):]
    cut = text.rfind(ANSWER_PREFIX.rstrip(" "))
    if cut != -1 and text[cut:].strip() == ANSWER_PREFIX.strip():
        text = text[:cut]
    return text.strip()


def split_of(family: str, question: str) -> str:
    """The split a question of ``family`` belongs to (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{family}\x00{question}".encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


@dataclass(frozen=True)
class Example:
    """One (prompt, reference answer) pair.

    ``prompt`` is the full templated text the model is fed, ending where the answer begins;
    ``answer`` is the reference answer (without end-of-sequence token); ``question`` is the
    bare question inside the template; ``family`` names the task family that generated it;
    ``meta`` holds family-specific details (e.g. the options of a multiple-choice question).
    """

    prompt: str
    answer: str
    family: str
    question: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ScoreResult:
    """Outcome of scoring one generation.

    ``parsable`` is False when no answer of the expected form could be extracted (then
    ``correct`` is False too); ``extracted`` is the answer that was read, if any.
    """

    correct: bool
    parsable: bool
    extracted: str | None = None

    def reward(self, unparsable_penalty: float | None = None) -> float:
        """+1 when correct, -1 when not; ``unparsable_penalty`` (e.g. -0.1) replaces -1 for an
        unparsable answer when given."""
        if self.correct:
            return 1.0
        if not self.parsable and unparsable_penalty is not None:
            return float(unparsable_penalty)
        return -1.0


Scorer = Callable[[str, Example], ScoreResult]


def answer_line(generation: str) -> str:
    """The part of a generation that holds the answer: up to the first newline, with
    end-of-sequence markers removed; leading "A:" echoes are dropped."""
    text = generation.replace("</s>", "\n").replace("<|endoftext|>", "\n")
    text = text.lstrip()
    # The model's own answer is a single line; whatever follows is not part of it.
    line = text.split("\n", 1)[0].strip()
    if line.startswith("A:"):
        line = line[2:].strip()
    return line


class Task:
    """A task: named generator of examples with deterministic splits and a scorer.

    Subclasses implement :meth:`sample` (one (question, answer, meta) triple from ``rng``) and
    :meth:`score`. ``family`` defaults to ``name``.
    """

    name: str = "task"
    family: str | None = None
    #: One line telling what the family asks (shown by the CLI / docs).
    description: str = ""

    def __init__(self, seed: int = DEFAULT_SEED):
        self.seed = seed
        if self.family is None:
            self.family = self.name

    # -- generation -----------------------------------------------------------------------
    def sample(self, rng: random.Random) -> tuple[str, str, dict]:
        raise NotImplementedError

    def make_example(self, question: str, answer: str, meta: dict | None = None) -> Example:
        return Example(prompt=format_prompt(question), answer=answer, family=self.family,
                       question=question, meta=dict(meta or {}))

    def _stream(self, split: str, distinct: bool = True) -> Iterator[Example]:
        rng = random.Random(f"{self.name}:{split}:{self.seed}")
        seen: set[str] = set()
        misses = 0
        while True:
            question, answer, meta = self.sample(rng)
            if (distinct and question in seen) or split_of(self.name, question) != split:
                misses += 1
                if misses > 200_000:
                    raise RuntimeError(f"task {self.name!r} ran out of distinct {split} questions")
                continue
            misses = 0
            if distinct:
                seen.add(question)
            yield self.make_example(question, answer, meta)

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of ``split`` (default size when ``n`` is None).

        Deterministic for a given task seed; no question appears in two splits, and no question
        appears twice in one split.
        """
        check_split(split)
        if n is None:
            n = DEFAULT_SIZES[split]
        out: list[Example] = []
        if n <= 0:
            return out
        for ex in self._stream(split):
            out.append(ex)
            if len(out) >= n:
                break
        return out

    def shortfall(self, split: str, n: int, have: int) -> str:
        """Why ``split`` holds ``have`` < ``n`` examples, for an error message."""
        return (f"{n} examples asked for, but task {self.name!r} has {have} distinct {split} "
                f"examples")

    def iter_examples(self, split: str, distinct: bool = True) -> Iterator[Example]:
        """A deterministic stream of examples of ``split``: distinct questions (the order of
        ``examples``; ends when the split's question space is exhausted), or, with
        ``distinct=False``, an endless stream sampled with replacement (for pre-training)."""
        return self._stream(check_split(split), distinct)

    # -- scoring --------------------------------------------------------------------------
    def extract(self, generation: str, example: Example | None = None) -> str | None:
        raise NotImplementedError

    def score(self, generation: str, example: Example) -> ScoreResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed})"


def as_answer(example: Example | str | Any) -> str:
    """The reference answer of an Example, or the value itself when given a plain string."""
    return example.answer if isinstance(example, Example) else str(example)


def first_examples(task, split: str, n: int) -> list[Example]:
    """Up to ``n`` examples of ``task``'s ``split`` (the order of ``Task.examples``): all it has
    when that is fewer (a JSONL file's split, a generated task's spent question space), where
    ``Task.examples`` of a generated task raises RuntimeError."""
    out: list[Example] = []
    try:
        for ex in islice(task.iter_examples(split), n):
            out.append(ex)
    except RuntimeError:        # a generated task ran out of distinct questions
        pass
    return out
