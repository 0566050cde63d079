"""Restatement before dispatch: pass 1 first has the base model rewrite each question in the
form the experts were trained on, then picks the mixture for the rewritten question, and pass 2
answers the rewritten question in its own prompt.

The tiny world's chain of thought (:mod:`t2fast.tasks.steps`) does the rewriting: asked
``step by step: <question>``, a base model pre-trained on the two-step families writes the
question as its training family's question before answering it
(``step by step: what is 147 plus 8?`` → ``147+8=?\\nA: 155``). :class:`Restated` keeps that
first step only and hands ``Q: 147+8=?\\nA: `` to the strategy it wraps and to pass 2, so an
expert answers the surface it was trained on rather than a new one. A question without a first
step in the model's answer is answered as asked. :func:`restated_questions` gives the
restated questions alone, :func:`restated_examples` a task's examples restated (CEM searches
its mixture on restated shots, scored as :func:`restated_task` says; section 3f of
``results/README.md`` restates its test questions and CEM's few-shot examples with them, once
each).

    engine.run(prompts, Restated(ClassifierDispatch(handle, tok, "classify"), handle, tok))
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..generation import generate_texts
from ..tasks import PARENT_FAMILY, extract_question, format_prompt, get_task
from ..tasks.steps import STEP_PREFIX, final_answer, first_step


#: The restatement's generation budget (a first step and its separator).
RESTATE_MAX_TOKENS = 64


def restatement_prompt(prompt: str, prefix: str = STEP_PREFIX) -> str:
    """The prompt that asks for ``prompt``'s first step: its question behind ``prefix`` (not
    prefixed twice), in the tiny world's template."""
    q = extract_question(prompt)
    return format_prompt(q if q.startswith(prefix) else prefix + q)


def restated_questions(handle, tokenizer, prompts: Sequence[str], *, prefix: str = STEP_PREFIX,
                       max_new_tokens: int = RESTATE_MAX_TOKENS, batch_size: int | None = 128
                       ) -> list[str | None]:
    """The question each prompt restates to: the first step the handle's base weights write
    for it behind ``prefix`` (:func:`restatement_prompt`), or None where they write none."""
    steps = [restatement_prompt(p, prefix) for p in prompts]
    handle.set_trainable_z(None)
    handle.set_mixture(None)
    gens = generate_texts(handle.model, tokenizer, steps, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    return [first_step(g) for g in gens]


def restated_examples(handle, tokenizer, examples: Sequence, **kwargs) -> list:
    """``examples`` (:class:`t2fast.tasks.Example`) as their restated questions: each restated
    once by :func:`restated_questions` (``kwargs`` go there; an example without a first step
    stays as asked), with its final answer (a two-step answer's last step, which the family's
    scorer and its parent's read alike)."""
    questions = restated_questions(handle, tokenizer, [e.prompt for e in examples], **kwargs)
    return [dataclasses.replace(e, answer=final_answer(e.answer), **(
        {} if q is None else {"prompt": format_prompt(q), "question": q}))
        for e, q in zip(examples, questions)]


def restated_task(task):
    """The task whose scorer and answer budget suit ``task``'s restated questions: its parent
    training family (:data:`t2fast.tasks.PARENT_FAMILY`) for a bundled family that has one,
    else ``task`` itself."""
    parent = PARENT_FAMILY.get(getattr(task, "name", None))
    return task if parent is None else get_task(parent)


class Restated:
    """Wraps a strategy (anything with ``select(prompts)``): :meth:`rewrite` restates the
    prompts with the base weights, ``select`` is the wrapped strategy's on the restated prompts
    (the engine calls both; :class:`t2fast.adapt.engine.TwoPassEngine` answers the restated
    prompts).

    Args:
        inner: the strategy that picks a mixture for each restated prompt.
        handle / tokenizer: the patched model (its base weights write the first step).
        prefix: what asks the model for its steps (default: the tiny world's ``step by step: ``;
            a question that already starts with it is not prefixed twice).
        max_new_tokens / batch_size: the restatement's generation budget and rows per call.
    """

    def __init__(self, inner, handle, tokenizer, *, prefix: str = STEP_PREFIX,
                 max_new_tokens: int = RESTATE_MAX_TOKENS, batch_size: int | None = 128):
        self.inner = inner
        self.handle = handle
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = f"restated {getattr(inner, 'name', type(inner).__name__)}"
        self.last_restated: list[str | None] = []

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as its restated question's prompt (:func:`restated_questions`; the
        prompt itself where the model wrote no first step); ``last_restated`` holds the
        restated questions (None there)."""
        self.last_restated = restated_questions(
            self.handle, self.tokenizer, prompts, prefix=self.prefix,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return [p if r is None else format_prompt(r)
                for p, r in zip(prompts, self.last_restated)]

    def select(self, prompts: Sequence[str]):
        return self.inner.select(prompts)
