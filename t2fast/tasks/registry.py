"""``get_task``: the bundled tasks (the families of :mod:`t2fast.tasks.families` and
``classify``) and user JSONL tasks by name."""
from __future__ import annotations

from functools import lru_cache

from .base import DEFAULT_SEED, Task
from .classification import Classification
from .families import (FAMILY_CLASSES, HELDOUT_FAMILIES, PARENT_FAMILY, TRAIN_FAMILIES,
                       family_task)

CLASSIFY = Classification.name


def task_names() -> tuple[str, ...]:
    """All bundled task names: training families, held-out families, then ``classify``."""
    return TRAIN_FAMILIES + HELDOUT_FAMILIES + (CLASSIFY,)


@lru_cache(maxsize=None)
def get_task(name: str, seed: int = DEFAULT_SEED) -> Task:
    """The bundled task called ``name`` (see :func:`task_names`).

    ``classify`` classifies prompts of the training families into their family name or
    ``other``. ``"gsm8k:PATH"``, ``"arc:PATH"``, ``"mbpp:PATH"`` and ``"humaneval:PATH"`` wrap a
    user-supplied JSONL file (see :mod:`t2fast.tasks.jsonl`), split 80/10/10 by question hash.
    Tasks are cached per (name, seed); they hold no mutable state.
    """
    kind, sep, path = name.partition(":")
    if sep and kind in ("gsm8k", "arc", "mbpp", "humaneval"):
        from .jsonl import load_jsonl_task
        return load_jsonl_task(kind, path, seed=seed)
    if name == CLASSIFY:
        return Classification(seed=seed)
    if name not in FAMILY_CLASSES:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return family_task(name, seed)
