"""Multiple-choice families (the paper's "reasoning" stand-in); the answer is a letter.

``choice`` (training): compare four 3-digit numbers:
``Q: Which is largest? A)347 B)712 C)128 D)550`` -> ``B`` (also "smallest").

``choice_words`` (transfer): the question of ``choice`` reworded:
``Q: Pick the highest number: A)347 B)712 C)128 D)550`` -> ``B`` (also "lowest").

``choice_order`` (held out): a different question type over words:
``Q: Which is first alphabetically? A)kot B)mun C)ant D)zeb`` -> ``C``.
"""
from __future__ import annotations

import random
import string

from .base import Example, ScoreResult, Task
from .extract import extract_choice

LETTERS = "ABCD"


def format_options(options) -> str:
    return " ".join(f"{LETTERS[i]}){o}" for i, o in enumerate(options))


class ChoiceTask(Task):
    """Base for lettered multiple-choice families; ``meta['options']`` holds option texts."""

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        options = example.meta.get("options") if example is not None else None
        labels = LETTERS[: len(options)] if options else LETTERS
        return extract_choice(generation, labels, [str(o) for o in options] if options else None)

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None:
            return ScoreResult(correct=False, parsable=False, extracted=None)
        return ScoreResult(correct=got == example.answer, parsable=True, extracted=got)


class NumberChoice(ChoiceTask):
    name = "choice"
    description = ("pick the largest / smallest of four 3-digit numbers: "
                   "'Which is largest? A)347 B)712 C)128 D)550' -> 'B'")

    def sample(self, rng: random.Random):
        kind = rng.choice(("largest", "smallest"))
        options = rng.sample(range(100, 1000), 4)
        target = max(options) if kind == "largest" else min(options)
        answer = LETTERS[options.index(target)]
        meta = {"options": options, "kind": kind}
        return self.question_of(meta), answer, meta

    def question_of(self, meta: dict) -> str:
        """The question of this family for the options and kind in ``meta``."""
        return f"Which is {meta['kind']}? {format_options(meta['options'])}"


class NumberChoiceWords(NumberChoice):
    name = "choice_words"
    description = ("transfer: choice reworded: 'Pick the highest number: A)347 B)712 C)128 "
                   "D)550' -> 'B'")
    #: The wording of each ``choice`` question kind.
    WORDS = {"largest": "highest", "smallest": "lowest"}

    def question_of(self, meta: dict) -> str:
        return f"Pick the {self.WORDS[meta['kind']]} number: {format_options(meta['options'])}"


class AlphabeticalChoice(ChoiceTask):
    name = "choice_order"
    description = ("held out: pick the word that comes first alphabetically: "
                   "'Which is first alphabetically? A)kot B)mun C)ant D)zeb' -> 'C'")

    def sample(self, rng: random.Random):
        words: list[str] = []
        while len(words) < 4:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
            if w not in words:
                words.append(w)
        answer = LETTERS[words.index(min(words))]
        return f"Which is first alphabetically? {format_options(words)}", answer, {"options": words}
