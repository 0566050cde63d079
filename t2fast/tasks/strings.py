"""String-transformation families (the paper's "code" stand-in), checked exactly.

``strings`` (training): one function applied to a three-letter lowercase word, written as a call:
``Q: reverse('kdf')`` -> ``fdk``; ``sort('dca')`` -> ``acd``; ``rotate('abc')`` -> ``bca``
(rotate left by one).

``strings_words`` (transfer): the functions of ``strings`` asked as an instruction:
``Q: reverse the letters of kdf`` -> ``fdk``.

``strings_compose`` (held out): two functions composed: ``Q: sort(reverse('kdf'))`` -> ``dfk``.
"""
from __future__ import annotations

import random
import string

from .base import Example, ScoreResult, Task
from .extract import extract_word

OPS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotate": lambda s: s[1:] + s[:1],
}


#: Letters per word of both families.
WORD_LEN = 3


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LEN))


class WordAnswerTask(Task):
    """Base for families whose answer is one exact word (case-sensitive)."""

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        return extract_word(generation)

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None or not got.isalpha():
            return ScoreResult(correct=False, parsable=False, extracted=got)
        return ScoreResult(correct=got == example.answer, parsable=True, extracted=got)


class StringOps(WordAnswerTask):
    name = "strings"
    description = "reverse / sort / rotate a 3-letter word: \"reverse('kdf')\" -> 'fdk'"

    def sample(self, rng: random.Random):
        op = rng.choice(sorted(OPS))
        w = _word(rng)
        meta = {"ops": [op], "word": w}
        return self.question_of(meta), OPS[op](w), meta

    def question_of(self, meta: dict) -> str:
        """The question of this family for the function and word in ``meta``."""
        return f"{meta['ops'][0]}('{meta['word']}')"


class StringWords(StringOps):
    name = "strings_words"
    description = ("transfer: a strings function as an instruction: "
                   "'reverse the letters of kdf' -> 'fdk'")

    def question_of(self, meta: dict) -> str:
        return f"{meta['ops'][0]} the letters of {meta['word']}"


class StringCompose(WordAnswerTask):
    name = "strings_compose"
    description = "held out: two string functions composed: \"sort(reverse('kdf'))\" -> 'dfk'"

    def sample(self, rng: random.Random):
        outer, inner = rng.sample(sorted(OPS), 2)
        w = _word(rng)
        return (f"{outer}({inner}('{w}'))", OPS[outer](OPS[inner](w)),
                {"ops": [inner, outer], "word": w})
