"""``get_task``: the bundled tasks (the families of :mod:`t2fast.tasks.families` and
``classify``) and user JSONL tasks by name."""
from __future__ import annotations

from functools import lru_cache

from .base import DEFAULT_SEED, SPLITS, Task
from .classification import Classification, TransferClassification
from .families import (FAMILY_CLASSES, HELDOUT_FAMILIES, STEP_FAMILIES, TRAIN_FAMILIES,
                       TRANSFER_FAMILIES, family_task)
from .jsonl import ADAPTERS, load_jsonl_task

CLASSIFY = Classification.name
CLASSIFY_TRANSFER = TransferClassification.name


def task_names() -> tuple[str, ...]:
    """All bundled task names: training, held-out, transfer and two-step families, then
    ``classify`` and ``classify_transfer``."""
    return (TRAIN_FAMILIES + HELDOUT_FAMILIES + TRANSFER_FAMILIES + STEP_FAMILIES
            + (CLASSIFY, CLASSIFY_TRANSFER))


#: Kinds of user-supplied JSONL data sets: ``get_task("KIND:PATH")``.
JSONL_KINDS = tuple(ADAPTERS)


def jsonl_spec(name) -> tuple[str, str | None, str] | None:
    """``(kind, split, path)`` of a JSONL task name, ``KIND:PATH`` (the records divided
    80/10/10 by question hash) or ``KIND@SPLIT:PATH`` (the whole file is that split, e.g.
    ``gsm8k@test:test.jsonl``); None for any other name."""
    if not isinstance(name, str):
        return None
    head, sep, path = name.partition(":")
    kind, at, split = head.partition("@")
    if not (sep and path and kind in JSONL_KINDS) or (at and split not in SPLITS):
        return None
    return kind, split or None, path


def is_task_name(name) -> bool:
    """Whether ``name`` names a task :func:`get_task` can build: a bundled task, or a JSONL
    data set (:func:`jsonl_spec`; the file is read only by :func:`get_task`)."""
    return name in task_names() or jsonl_spec(name) is not None


@lru_cache(maxsize=None)
def get_task(name: str, seed: int = DEFAULT_SEED) -> Task:
    """The bundled task called ``name`` (see :func:`task_names`).

    ``classify`` classifies prompts of the training families into their family name or
    ``other``; ``classify_transfer`` those of the transfer families into their training
    family's name or ``other``. ``"gsm8k:PATH"``, ``"arc:PATH"``, ``"mbpp:PATH"`` and
    ``"humaneval:PATH"`` wrap a user-supplied JSONL file (see :mod:`t2fast.tasks.jsonl`), split
    80/10/10 by question hash; ``"gsm8k@test:PATH"`` makes the whole file the test split
    (:func:`jsonl_spec`).
    Tasks are cached per (name, seed); they hold no mutable state.
    """
    spec = jsonl_spec(name)
    if spec is not None:
        kind, split, path = spec
        return load_jsonl_task(kind, path, split=split, seed=seed)
    if name == CLASSIFY:
        return Classification(seed=seed)
    if name == CLASSIFY_TRANSFER:
        return TransferClassification(seed=seed)
    if name not in FAMILY_CLASSES:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}; "
                       f"a JSONL data set: KIND:FILE or KIND@SPLIT:FILE (KIND: "
                       f"{', '.join(JSONL_KINDS)}; SPLIT: {', '.join(SPLITS)})")
    return family_task(name, seed)
