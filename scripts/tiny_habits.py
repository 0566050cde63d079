"""Competing habits of the tiny world's pre-training corpus.

SVF amplifies or damps abilities the base model already has (the paper's premise); REINFORCE
with a +-1 reward sharpens what the model already samples. A base model that lacks a skill gives
it nothing to amplify, and one that always answers right leaves no room. So the tiny model is
pre-trained on a corpus in which a share of each task's answers follows a *competing habit*, a
second plausible rule, instead of the task's rule:

* ``arith``: ``+`` and ``-`` swapped (``a+b`` answered ``|a-b|``, ``a-b`` answered ``a+b``);
* ``arith_chain``: every ``+`` and ``-`` swapped (the absolute value of the result);
* ``strings``: ``reverse`` copies the word, ``sort`` sorts descending, ``rotate`` rotates right;
* ``strings_compose``: both functions replaced by their habits;
* ``choice``: the opposite extreme (largest <-> smallest);
* ``choice_order``: the last alphabetically;
* ``classify``: the next label in the cycle arith -> strings -> choice -> other -> arith;
* the transfer families (``arith_words``, ``strings_words``, ``choice_words``) and
  ``classify_transfer``: the habit of the family they are a new surface of;
* the two-step families (``arith_steps`` ...): the question restated right, then the parent
  family's habit.

The model thus knows both rules and, where a task's habit share is near one half, picks the
task's rule for only part of the questions under greedy decoding: it has the ability but does
not prefer it, the situation SVF experts are meant for. Only the pre-training corpus carries
habits: validation and test answers (and the rewards of RL training) always follow the task's
rule.
"""
from __future__ import annotations

import dataclasses
import random

from t2fast.tasks.base import Example
from t2fast.tasks.choice import LETTERS
from t2fast.tasks.steps import STEP_SEPARATOR, final_answer

_STRING_HABITS = {
    "reverse": lambda s: s,
    "sort": lambda s: "".join(sorted(s, reverse=True)),
    "rotate": lambda s: s[-1:] + s[:-1],
}
_LABEL_CYCLE = ("arith", "strings", "choice", "other")


def _arith(ex: Example) -> str:
    a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
    return str(abs(a - b) if op == "+" else a + b)


def _arith_chain(ex: Example) -> str:
    terms, ops = ex.meta["terms"], ex.meta["ops"]
    value = terms[0]
    for op, t in zip(ops, terms[1:]):
        value = value - t if op == "+" else value + t
    return str(abs(value))


def _strings(ex: Example) -> str:
    word = ex.meta["word"]
    for op in ex.meta["ops"]:
        word = _STRING_HABITS[op](word)
    return word


def _choice(ex: Example) -> str:
    options = ex.meta["options"]
    target = min(options) if ex.meta["kind"] == "largest" else max(options)
    return LETTERS[options.index(target)]


def _choice_order(ex: Example) -> str:
    options = ex.meta["options"]
    return LETTERS[options.index(max(options))]


def _classify(ex: Example) -> str:
    return _LABEL_CYCLE[(_LABEL_CYCLE.index(ex.answer) + 1) % len(_LABEL_CYCLE)]


def _two_step(habit):
    """The habit of a two-step family: the question restated right, then the parent's habit."""
    def answer(ex: Example) -> str:
        return f"{ex.meta['restated']}{STEP_SEPARATOR}{habit(ex)}"
    return answer


#: task name -> the habit answer of one of its examples.
HABITS = {"arith": _arith, "arith_chain": _arith_chain, "strings": _strings,
          "strings_compose": _strings, "choice": _choice, "choice_order": _choice_order,
          "classify": _classify, "arith_words": _arith, "strings_words": _strings,
          "choice_words": _choice, "classify_transfer": _classify,
          "arith_steps": _two_step(_arith), "strings_steps": _two_step(_strings),
          "choice_steps": _two_step(_choice)}


def with_habit(ex: Example, task: str) -> Example:
    """``ex`` with its answer replaced by the habit's (``meta['habit'] = True``)."""
    return dataclasses.replace(ex, answer=HABITS[task](ex), meta={**ex.meta, "habit": True})


class HabitStream:
    """Examples of ``task`` of which a share (``share``, changeable between draws) answers with
    the habit; deterministic for a seed."""

    def __init__(self, task: str, stream, share: float, seed: int):
        if task not in HABITS and share > 0:
            raise SystemExit(f"--habit: no habit is defined for task {task!r}; "
                             f"expected one of {sorted(HABITS)}")
        self.task, self.stream, self.share = task, stream, share
        self.rng = random.Random(f"habit:{task}:{seed}")

    def __next__(self) -> Example:
        ex = next(self.stream)
        if self.share > 0 and self.rng.random() < self.share:
            return with_habit(ex, self.task)
        return ex

    def __iter__(self):
        return self


def answers_with_habit(name: str, task, generation: str, example: Example) -> bool:
    """Whether ``generation`` answers ``example`` of task ``name`` with the habit's answer
    where that differs from the task's (a habit answer is a wrong answer)."""
    habit_answer, answer = final_answer(HABITS[name](example)), final_answer(example.answer)
    return habit_answer != answer and task.extract(generation, example) == habit_answer


def habit_rates(model, tokenizer, names, n: int = 500, max_new_tokens: int = 10) -> dict:
    """How often ``model``'s greedy answers on the first ``n`` test questions of each task in
    ``names`` are the task's answer, the habit's answer (where it differs from the task's) and
    either: ``{name: {"task": .., "habit": .., "either": ..}}``. Each task generates
    ``max_new_tokens`` tokens, or its own budget where that is longer (two-step answers)."""
    from t2fast.models import generate_greedy
    from t2fast.tasks import get_task
    from t2fast.train import max_new_tokens_for

    rates = {}
    for name in names:
        task = get_task(name)
        exs = task.examples("test", n)
        gens = generate_greedy(model, tokenizer, [e.prompt for e in exs], batch_size=128,
                               max_new_tokens=max(max_new_tokens, max_new_tokens_for(name)))
        right = habit = 0
        for g, e in zip(gens, exs):
            right += task.score(g, e).correct
            habit += answers_with_habit(name, task, g, e)
        rates[name] = {"task": right / len(exs), "habit": habit / len(exs),
                       "either": (right + habit) / len(exs)}
    return rates


def rates_table(rates: dict) -> str:
    """The markdown table of :func:`habit_rates` (as in the tiny model's README)."""
    rows = ["| task | task's answer | habit's answer | either |", "| --- | --- | --- | --- |"]
    rows += [f"| `{name}` | {r['task']:.3f} | {r['habit']:.3f} | {r['either']:.3f} |"
             for name, r in rates.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    # The habit table of t2fast/assets/tiny_llama/README.md, for the bundled model or a folder.
    import argparse

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2fast.models import tiny_model_path
    from t2fast.tasks import CLASSIFY, HELDOUT_FAMILIES, TRAIN_FAMILIES

    ap = argparse.ArgumentParser(description="greedy habit rates of a tiny model (test split)")
    ap.add_argument("--model", default=str(tiny_model_path()))
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    print(rates_table(habit_rates(lm, tok, [*TRAIN_FAMILIES, *HELDOUT_FAMILIES, CLASSIFY],
                                  args.n)))
