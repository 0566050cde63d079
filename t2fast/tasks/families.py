"""The bundled task families by name (without ``classify``, which is built over them)."""
from __future__ import annotations

from functools import lru_cache

from .arithmetic import Arithmetic, ArithmeticChain, ArithmeticWords
from .base import DEFAULT_SEED, Task
from .choice import AlphabeticalChoice, NumberChoice, NumberChoiceWords
from .steps import ArithmeticSteps, NumberChoiceSteps, StringSteps
from .strings import StringCompose, StringOps, StringWords

#: Families the tiny model is pre-trained on and experts are trained for
#: (stand-ins for the paper's math, code and reasoning).
TRAIN_FAMILIES: tuple[str, ...] = ("arith", "strings", "choice")
#: Families that resemble but differ from the training ones, for adaptation experiments.
HELDOUT_FAMILIES: tuple[str, ...] = ("arith_chain", "strings_compose", "choice_order")
#: Transfer families (like GSM8K -> MATH): each keeps the skill and the competing habit of one
#: training family and changes only its surface. They are meant for the base model's
#: pre-training (train split) and are never trained on by an expert.
TRANSFER_FAMILIES: tuple[str, ...] = ("arith_words", "strings_words", "choice_words")
#: Two-step transfer families: the transfer families' questions (behind ``step by step:``)
#: answered by restating them as the parent family's question first (:mod:`.steps`). Meant,
#: like the transfer families, for pre-training only.
STEP_FAMILIES: tuple[str, ...] = ("arith_steps", "strings_steps", "choice_steps")
#: Which training family each held-out, transfer or two-step family resembles (the expert a
#: classifier should pick).
PARENT_FAMILY: dict[str, str] = {
    "arith_chain": "arith", "strings_compose": "strings", "choice_order": "choice",
    "arith_words": "arith", "strings_words": "strings", "choice_words": "choice",
    "arith_steps": "arith", "strings_steps": "strings", "choice_steps": "choice",
}
#: Each family's kind, as reports name it.
FAMILY_KINDS: dict[str, str] = {
    **dict.fromkeys(TRAIN_FAMILIES, "training"), **dict.fromkeys(HELDOUT_FAMILIES, "held out"),
    **dict.fromkeys(TRANSFER_FAMILIES, "transfer"), **dict.fromkeys(STEP_FAMILIES, "two-step"),
}
#: family name → its task class.
FAMILY_CLASSES: dict[str, type[Task]] = {
    cls.name: cls for cls in (Arithmetic, ArithmeticChain, ArithmeticWords, StringOps,
                              StringCompose, StringWords, NumberChoice, AlphabeticalChoice,
                              NumberChoiceWords, ArithmeticSteps, StringSteps, NumberChoiceSteps)
}


@lru_cache(maxsize=None)
def family_task(name: str, seed: int = DEFAULT_SEED) -> Task:
    """The task of the bundled family ``name`` (cached per (name, seed); tasks hold no mutable
    state). Raises ``KeyError`` for another name."""
    return FAMILY_CLASSES[name](seed=seed)
