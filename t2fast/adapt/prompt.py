"""Strategy A — prompt-based dispatch.

Pass 1 asks the model, with its **base weights** (whatever expert was last used, the mixture is
reset to the base for pass 1), to classify each prompt into one of the experts' categories or
"other"; the answer is parsed robustly (:func:`parse_category`), and pass 2 uses the expert of
that category, or the base model for "other" and for anything that cannot be parsed.

The default adaptation prompt is the tiny world's (``Q: classify: <question>\\nA: ``), which the
bundled model was trained on. For general chat models pass ``prompt_fn=paper_style_prompt`` (or
any callable ``(prompt, labels) -> str``).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from ..generation import generate_texts
from ..tasks import OTHER, classify_prompt, extract_question

SYNONYMS = {"others": OTHER, "none": OTHER, "unknown": OTHER, "neither": OTHER}

PAPER_STYLE_TEMPLATE = (
    "Analyze the given question and classify it into one of these categories: {labels}, or "
    "'{other}' if it fits none. Answer with the category name only.\n"
    "Question: {question}\nCategory:")


def tiny_world_prompt(prompt: str, labels: Sequence[str]) -> str:
    """The tiny world's classification prompt (labels are implied by its training)."""
    return classify_prompt(prompt)


def paper_style_prompt(prompt: str, labels: Sequence[str]) -> str:
    """A paper-style adaptation prompt listing the categories, for instruction-tuned models;
    it asks the bare question (a task prompt's ``Q: ...\\nA:`` template removed, as a server
    request's text is asked)."""
    return PAPER_STYLE_TEMPLATE.format(labels=", ".join(f"'{l}'" for l in labels), other=OTHER,
                                       question=extract_question(prompt))


#: How pass 1 phrases the question, by name (``t2fast adapt`` and ``t2fast serve``
#: ``--adapt-template``): the tiny world's template, or the paper's for chat models.
PROMPT_TEMPLATES = {"tiny": tiny_world_prompt, "paper": paper_style_prompt}


def parse_category(text: str, labels: Sequence[str], other: str = OTHER,
                   synonyms: dict[str, str] | None = None) -> str:
    """The category a classification answer names, or ``other``.

    Tolerates case, quotes and punctuation, "Category: x", "the answer is x", plurals/synonyms of
    "other", a truncated label ("arit") when only one label starts so, and a label mentioned
    anywhere in the first line (the earliest mention wins). Only the first line is read.
    """
    syn = {**SYNONYMS, **{k.lower(): v for k, v in (synonyms or {}).items()}}
    by_lower = {l.lower(): l for l in labels}
    line = text.replace("</s>", "\n").strip().split("\n", 1)[0].strip().lower()
    line = re.sub(r"^(category|class|label|answer|a)\s*[:=\-]\s*", "", line)
    line = re.sub(r"^(the )?(answer|category) is\s*", "", line)
    words = [w for w in re.split(r"[^a-z0-9_\-]+", line) if w]
    if not words:
        return other
    first = words[0]
    for cand in (first, first.rstrip("s")):
        if cand in by_lower:
            return by_lower[cand]
        if cand in syn:
            return syn[cand] if syn[cand] in labels or syn[cand] == other else other
        if cand == other:
            return other
    # whole-line search: earliest label mention
    best, best_pos = None, None
    for low, label in by_lower.items():
        m = re.search(rf"(?<![a-z0-9_]){re.escape(low)}(?![a-z0-9_])", line)
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = label, m.start()
    if best is not None:
        return best
    prefixed = [label for low, label in by_lower.items() if len(first) >= 3 and
                low.startswith(first)]
    if len(prefixed) == 1:
        return prefixed[0]
    return other


class PromptDispatch:
    """Strategy A: classify with the base weights, then pick the category's expert.

    Args:
        handle: the :class:`t2fast.patching.SVFHandle` of the patched model.
        tokenizer: its tokenizer.
        categories: ``{label: expert name}`` (default: every loaded expert, labelled by its
            name); "other" and unknown labels map to the base model.
        prompt_fn: ``(prompt, labels) -> classification prompt`` (default: the tiny world's).
        max_new_tokens / batch_size: pass-1 generation budget and rows per call.
    """

    name = "prompt"
    pass1_mixture = None   # base weights

    def __init__(self, handle, tokenizer, categories: dict[str, str] | Sequence[str] | None = None,
                 *, prompt_fn: Callable[[str, Sequence[str]], str] = tiny_world_prompt,
                 max_new_tokens: int = 10, batch_size: int | None = 128,
                 synonyms: dict[str, str] | None = None):
        self.handle = handle
        self.tokenizer = tokenizer
        if categories is None:
            categories = list(handle.expert_names)
        if not isinstance(categories, dict):
            categories = {c: c for c in categories}
        unknown = [e for e in categories.values() if e is not None and
                   e not in handle.expert_names]
        if unknown:
            raise ValueError(f"categories map to experts that are not loaded: {unknown}; "
                             f"loaded: {handle.expert_names}")
        if OTHER in categories:
            raise ValueError(f"'{OTHER}' is the fallback category (base model); do not map it")
        if not categories:
            raise ValueError("prompt dispatch needs at least one category")
        self.categories = dict(categories)
        self.labels = list(self.categories)
        self.prompt_fn = prompt_fn
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.synonyms = synonyms
        self.last_generations: list[str] = []

    def classification_prompts(self, prompts: Sequence[str]) -> list[str]:
        return [self.prompt_fn(p, self.labels) for p in prompts]

    def classify(self, prompts: Sequence[str]) -> list[str]:
        """Pass 1: one category (or "other") per prompt, in one batched generation."""
        self.handle.set_trainable_z(None)
        self.handle.set_mixture(self.pass1_mixture)
        gens = generate_texts(self.handle.model, self.tokenizer,
                              self.classification_prompts(prompts), batch_size=self.batch_size,
                              max_new_tokens=self.max_new_tokens)
        self.last_generations = gens
        return [parse_category(g, self.labels, synonyms=self.synonyms) for g in gens]

    def select(self, prompts: Sequence[str]) -> tuple[list, list[str]]:
        """(mixture spec per prompt — an expert name or None for the base —, labels)."""
        labels = self.classify(prompts)
        return [self.categories.get(l) for l in labels], labels
