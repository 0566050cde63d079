"""Arithmetic families (the paper's "math" stand-in).

``arith`` (training): a number below 200 and a digit, added or subtracted, e.g.
``Q: 147+8=?`` -> ``155`` or ``Q: 3+85=?`` -> ``88`` (the digit on either side of ``+``; ``-`` never
goes below zero: ``85-7``, and ``7-3`` when the number is a digit too).

``arith_words`` (transfer): the questions of ``arith`` asked in words, e.g.
``Q: what is 147 plus 8?`` -> ``155``.

``arith_chain`` (held out): a 1-2 digit number, then two 1-digit numbers, chained with
``+``/``-`` and never below zero, e.g. ``Q: 34+7-5=?`` -> ``36``.
"""
from __future__ import annotations

import random

from .base import Example, ScoreResult, Task
from .extract import extract_short_number, numbers_equal


def _operand(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10 ** digits - 1)


class NumberAnswerTask(Task):
    """Base for families whose answer is an integer; scored numerically (leading zeros,
    ``+`` sign and thousands commas accepted)."""

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        return extract_short_number(generation)

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None:
            return ScoreResult(correct=False, parsable=False, extracted=None)
        return ScoreResult(correct=numbers_equal(got, example.answer), parsable=True, extracted=got)


class Arithmetic(NumberAnswerTask):
    name = "arith"
    description = "a number below 200 and a digit, + or -: '147+8=?' -> '155'"

    def sample(self, rng: random.Random):
        op = rng.choice("+-")
        a, b = rng.randint(0, 199), rng.randint(0, 9)
        if (op == "-" and a < b) or (op == "+" and rng.random() < 0.5):
            a, b = b, a
        value = a + b if op == "+" else a - b
        meta = {"a": a, "b": b, "op": op}
        return self.question_of(meta), str(value), meta

    def question_of(self, meta: dict) -> str:
        """The question of this family for the operands and operation in ``meta``."""
        return f"{meta['a']}{meta['op']}{meta['b']}=?"


class ArithmeticWords(Arithmetic):
    name = "arith_words"
    description = "transfer: arith asked in words: 'what is 147 plus 8?' -> '155'"

    def question_of(self, meta: dict) -> str:
        word = "plus" if meta["op"] == "+" else "minus"
        return f"what is {meta['a']} {word} {meta['b']}?"


class ArithmeticChain(NumberAnswerTask):
    name = "arith_chain"
    description = ("held out: a small number, then two digits, chained with + and - (never "
                   "below zero): '34+7-5=?' -> '36'")

    def sample(self, rng: random.Random):
        while True:
            terms = [_operand(rng, 2), rng.randint(0, 9), rng.randint(0, 9)]
            ops = [rng.choice("+-") for _ in range(2)]
            value, partial = terms[0], []
            for op, t in zip(ops, terms[1:]):
                value = value + t if op == "+" else value - t
                partial.append(value)
            if min(partial) >= 0:
                break
        q = f"{terms[0]}{ops[0]}{terms[1]}{ops[1]}{terms[2]}=?"
        return q, str(value), {"terms": terms, "ops": ops}
