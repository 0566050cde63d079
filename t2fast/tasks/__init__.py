"""Task families of the bundled tiny world, their scorers, and adapters for real data sets.

>>> from t2fast.tasks import get_task, TRAIN_FAMILIES
>>> task = get_task("arith")
>>> ex = task.examples("test", n=1)[0]
>>> ex.prompt
'Q: 16+0=?\\nA: '
>>> task.score("16", ex).reward(), task.score("15", ex).reward()
(1.0, -1.0)
"""
from .base import (DEFAULT_SEED, DEFAULT_SIZES, PROMPT_TEMPLATE, SPLITS, Example, ScoreResult,
                   Task, extract_question, format_prompt, split_of)
from .classification import CLASSIFY_PREFIX, OTHER, classify_prompt, classify_question
from .families import (FAMILY_KINDS, HELDOUT_FAMILIES, PARENT_FAMILY, STEP_FAMILIES,
                       TRAIN_FAMILIES, TRANSFER_FAMILIES)
from .registry import CLASSIFY, CLASSIFY_TRANSFER, get_task, task_names

CLASSIFY_LABELS: tuple[str, ...] = TRAIN_FAMILIES + (OTHER,)

__all__ = [
    "CLASSIFY", "CLASSIFY_LABELS", "CLASSIFY_PREFIX", "CLASSIFY_TRANSFER", "DEFAULT_SEED",
    "DEFAULT_SIZES", "Example", "FAMILY_KINDS", "HELDOUT_FAMILIES", "OTHER", "PARENT_FAMILY",
    "PROMPT_TEMPLATE", "SPLITS", "STEP_FAMILIES", "ScoreResult", "TRAIN_FAMILIES",
    "TRANSFER_FAMILIES", "Task", "classify_prompt", "classify_question", "extract_question",
    "format_prompt", "get_task", "split_of", "task_names",
]
