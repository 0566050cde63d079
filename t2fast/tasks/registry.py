"""Names of the bundled task families and ``get_task``."""
from __future__ import annotations

from functools import lru_cache

from .arithmetic import Arithmetic, ArithmeticChain
from .base import DEFAULT_SEED, Task
from .choice import AlphabeticalChoice, NumberChoice
from .strings import StringCompose, StringOps

#: Families the tiny model is pre-trained on and experts are trained for
#: (stand-ins for the paper's math, code and reasoning).
TRAIN_FAMILIES: tuple[str, ...] = ("arith", "strings", "choice")
#: Families that resemble but differ from the training ones, for adaptation experiments.
HELDOUT_FAMILIES: tuple[str, ...] = ("arith_chain", "strings_compose", "choice_order")
#: Which training family each held-out family resembles (the expert a classifier should pick).
PARENT_FAMILY: dict[str, str] = {
    "arith_chain": "arith", "strings_compose": "strings", "choice_order": "choice",
}
CLASSIFY = "classify"

_CLASSES: dict[str, type[Task]] = {
    cls.name: cls for cls in (Arithmetic, ArithmeticChain, StringOps, StringCompose,
                              NumberChoice, AlphabeticalChoice)
}


def task_names() -> tuple[str, ...]:
    """All bundled task names: training families, held-out families, then ``classify``."""
    return TRAIN_FAMILIES + HELDOUT_FAMILIES + (CLASSIFY,)


@lru_cache(maxsize=None)
def get_task(name: str, seed: int = DEFAULT_SEED) -> Task:
    """The bundled task called ``name`` (see :func:`task_names`).

    ``classify`` classifies prompts of the training families into their family name or
    ``other``. ``"gsm8k:PATH"``, ``"arc:PATH"``, ``"mbpp:PATH"`` and ``"humaneval:PATH"`` wrap a
    user-supplied JSONL file (see :mod:`t2fast.tasks.jsonl`), split 80/10/10 by question hash. Tasks are cached per (name, seed); they hold no mutable state.
    """
    kind, sep, path = name.partition(":")
    if sep and kind in ("gsm8k", "arc", "mbpp", "humaneval"):
        from .jsonl import load_jsonl_task
        return load_jsonl_task(kind, path, seed=seed)
    if name == CLASSIFY:
        from .classification import Classification
        return Classification(seed=seed)
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None
    return cls(seed=seed)
