"""Arithmetic families (the paper's "math" stand-in).

``arith`` (training): one operation on small integers, e.g. ``Q: 47+85=?`` -> ``132``;
``+`` and ``-`` on 1-2 digit operands (``-`` never goes below zero: ``85-47``, not ``47-85``),
``*`` of a 1-digit by a 1-2 digit number.

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
    description = "one +, - or * on small integers: '47+85=?' -> '132'"

    def sample(self, rng: random.Random):
        op = rng.choices("+-*", weights=(2, 2, 1))[0]
        if op == "*":
            a, b = rng.randint(2, 19), rng.randint(2, 9)
            if rng.random() < 0.5:
                a, b = b, a
            value = a * b
        else:
            a, b = _operand(rng, 2), _operand(rng, 2)
            if op == "-" and a < b:
                a, b = b, a
            value = a + b if op == "+" else a - b
        return f"{a}{op}{b}=?", str(value), {"a": a, "b": b, "op": op}


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
