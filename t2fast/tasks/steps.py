"""Two-step transfer families: a transfer family's question, answered by first restating it as
its parent family's question and then answering that (the tiny world's chain of thought, as a
GSM8K-trained skill is reused on MATH through the same written steps).

``arith_steps``: ``Q: step by step: what is 147 plus 8?`` -> ``147+8=?\\nA: 155``

``strings_steps``: ``Q: step by step: reverse the letters of kdf`` -> ``reverse('kdf')\\nA: fdk``

``choice_steps``: ``Q: step by step: Pick the highest number: A)347 B)712 C)128 D)550`` ->
``Which is largest? A)347 B)712 C)128 D)550\\nA: B``

The reference answer (``Example.answer``) is the whole two-step text, what pre-training teaches;
only the final answer, after the last ``\\nA:``, is scored, with the parent family's scorer (the
restatement itself is not checked, as a GSM8K scorer reads only the final number). The
questions are those of the word transfer family behind the prefix ``step by step:``, so one
base model can learn both.
"""
from __future__ import annotations

import dataclasses
import random

from .arithmetic import Arithmetic, ArithmeticWords
from .base import ANSWER_PREFIX, Example, ScoreResult, Task
from .choice import NumberChoice, NumberChoiceWords
from .strings import StringOps, StringWords

#: What a two-step question starts with.
STEP_PREFIX = "step by step: "
#: What separates the restated question from the final answer.
STEP_SEPARATOR = ANSWER_PREFIX
#: The separator as read back from a generation (its trailing space may be missing).
STEP_MARK = STEP_SEPARATOR.rstrip(" ")


def final_answer(text: str) -> str:
    """The part of a two-step answer after its last separator, stripped (all of ``text`` if it
    has none)."""
    return text.rsplit(STEP_MARK, 1)[-1].strip()


def first_step(text: str) -> str | None:
    """The first step of a two-step answer: the text before its first separator, stripped;
    None when there is no separator or nothing before it."""
    if STEP_MARK not in text:
        return None
    return text.split(STEP_MARK, 1)[0].strip() or None


def restated_right(generation: str, example: Example) -> bool:
    """Whether ``generation``'s first step is exactly the parent question of ``example``."""
    return first_step(generation) == example.meta["restated"]


class TwoStepTask(Task):
    """Mixin over a word transfer family: the question gets :data:`STEP_PREFIX`, the answer
    restates the parent family's question first; scoring reads the final answer only."""

    #: The parent (training) family class whose question the first step writes.
    parent_class: type[Task]

    def sample(self, rng: random.Random):
        question, answer, meta = super().sample(rng)
        restated = self.parent_class.question_of(self, meta)
        return (STEP_PREFIX + question, f"{restated}{STEP_SEPARATOR}{answer}",
                {**meta, "restated": restated})

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        return super().extract(final_answer(generation), example)

    def score(self, generation: str, example: Example) -> ScoreResult:
        final = dataclasses.replace(example, answer=final_answer(example.answer))
        return super().score(final_answer(generation), final)


class ArithmeticSteps(TwoStepTask, ArithmeticWords):
    name = "arith_steps"
    description = ("two-step transfer: arith in words, restated then answered: "
                   "'step by step: what is 147 plus 8?' -> '147+8=?\\nA: 155'")
    parent_class = Arithmetic


class StringSteps(TwoStepTask, StringWords):
    name = "strings_steps"
    description = ("two-step transfer: a strings instruction, restated then answered: "
                   "'step by step: reverse the letters of kdf' -> \"reverse('kdf')\\nA: fdk\"")
    parent_class = StringOps


class NumberChoiceSteps(TwoStepTask, NumberChoiceWords):
    name = "choice_steps"
    description = ("two-step transfer: choice reworded, restated then answered: "
                   "'step by step: Pick the highest number: ...' -> 'Which is largest? ...\\nA: B'")
    parent_class = NumberChoice
