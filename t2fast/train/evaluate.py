"""Greedy evaluation on a task split, with Wilson 95% intervals and paired McNemar tests."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..generation import generate_texts


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96); (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of two systems scored on the *same* examples.

    ``a``, ``b``: per-example correctness (same length, same order). Only discordant examples
    count: ``a_only`` (a right, b wrong) and ``b_only``; under "equally accurate" each
    discordant example is a fair coin, so p = P(Binomial(a_only + b_only, 1/2) at least as far
    from the middle as observed), two-sided, capped at 1 (p = 1 with no discordant example).
    Returns ``{"a_only", "b_only", "p"}``.
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact: {len(a)} vs {len(b)} examples; the test is paired "
                         f"(both systems scored on the same examples)")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


@dataclass
class EvalResult:
    """Accuracy of greedy generations on ``n`` examples of a task."""
    task: str
    n: int
    correct: int
    parsable: int
    generations: list[str] = field(default_factory=list, repr=False)
    extracted: list = field(default_factory=list, repr=False)
    correct_mask: list[bool] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def summary(self) -> dict:
        lo, hi = self.ci95
        return {"task": self.task, "n": self.n, "correct": self.correct,
                "accuracy": self.accuracy, "ci95": [lo, hi],
                "parsable": self.parsable / self.n if self.n else 0.0}

    def __str__(self) -> str:
        lo, hi = self.ci95
        return (f"{self.task}: {self.accuracy:.3f} [{lo:.3f}, {hi:.3f}] "
                f"({self.correct}/{self.n}, parsable {self.parsable}/{self.n})")


def score_generations(task, generations: Sequence[str], examples: Sequence) -> EvalResult:
    correct = parsable = 0
    mask, extracted = [], []
    for g, ex in zip(generations, examples):
        s = task.score(g, ex)
        correct += int(s.correct)
        parsable += int(s.parsable)
        mask.append(bool(s.correct))
        extracted.append(s.extracted)
    return EvalResult(task.name, len(examples), correct, parsable, list(generations), extracted,
                      mask)


def evaluate(model, tokenizer, task, examples: Sequence, *, max_new_tokens: int,
             batch_size: int = 128, before_chunk: Callable[[int, int], None] | None = None
             ) -> EvalResult:
    """Greedy generations for ``examples`` scored by ``task``."""
    gens = generate_texts(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size,
                          before_chunk=before_chunk, max_new_tokens=max_new_tokens)
    return score_generations(task, gens, examples)
