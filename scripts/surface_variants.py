"""Surface variants of the training families: near transfer, measured on every variant listed.

The transfer families (``arith_words`` ...) reword a training family's questions so much that
the base model must be pre-trained on them; experts then did not transfer to them
(``t2fast/assets/tiny_llama/README.md``, probe 7c). A *surface variant* changes a question
much less (spacing, quotes, case, punctuation) and is never pre-trained on: whatever the base
model answers on it, it answers by generalising from the training family. Each variant is a
function of the question text, applied to the training family's *test* questions (so no
variant question was an RL training question). ``scripts/make_results.py`` measures every
variant below, not a selection: the base model, the parent family's expert and both
dispatchers.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

from t2fast.tasks import Example, format_prompt, get_task


def _spaced_operator(q: str) -> str:
    return re.sub(r"([+-])", r" \1 ", q)


def _leading_zero(q: str) -> str:
    return re.sub(r"(?<!\d)(\d)(?!\d)", r"0\1", q)


def _function_upper(q: str) -> str:
    name, rest = q.split("(", 1)
    return f"{name.upper()}({rest}"


def _which(q: str, new: str) -> str:
    return q.replace("Which is ", new, 1)


#: family -> variant name -> (example of the change, the question's transform).
VARIANTS: dict[str, dict[str, tuple[str, Callable[[str], str]]]] = {
    "arith": {
        "as trained": ("147+8=?", lambda q: q),
        "spaced": ("147 + 8 = ?", lambda q: _spaced_operator(q).replace("=?", " = ?")),
        "spaced operator": ("147 + 8=?", _spaced_operator),
        "space before =": ("147+8 =?", lambda q: q.replace("=?", " =?")),
        "space before ?": ("147+8= ?", lambda q: q.replace("=?", "= ?")),
        "no =": ("147+8?", lambda q: q.replace("=?", "?")),
        "no ?": ("147+8=", lambda q: q.replace("=?", "=")),
        "??": ("147+8=??", lambda q: q + "?"),
        "parentheses": ("(147+8)=?", lambda q: "(" + q.replace("=?", ")=?")),
        "leading zero": ("147+08=?", _leading_zero),
        "compute": ("compute 147+8=?", lambda q: "compute " + q),
        "leading space": (" 147+8=?", lambda q: " " + q),
    },
    "strings": {
        "as trained": ("reverse('kdf')", lambda q: q),
        "double quotes": ('reverse("kdf")', lambda q: q.replace("'", '"')),
        "no quotes": ("reverse(kdf)", lambda q: q.replace("'", "")),
        "spaced argument": ("reverse( 'kdf' )", lambda q: q.replace("(", "( ").replace(")", " )")),
        "space before (": ("reverse ('kdf')", lambda q: q.replace("(", " (", 1)),
        "upper case": ("REVERSE('kdf')", _function_upper),
        "capitalised": ("Reverse('kdf')", lambda q: q[0].upper() + q[1:]),
        ";": ("reverse('kdf');", lambda q: q + ";"),
        "=?": ("reverse('kdf')=?", lambda q: q + "=?"),
        "compute": ("compute reverse('kdf')", lambda q: "compute " + q),
        "leading space": (" reverse('kdf')", lambda q: " " + q),
    },
    "choice": {
        "as trained": ("Which is largest? A)347 B)712 ...", lambda q: q),
        "spaced options": ("Which is largest? A) 347 B) 712 ...",
                           lambda q: re.sub(r"([A-D])\)", r"\1) ", q)),
        "options with commas": ("Which is largest? A)347, B)712, ...",
                                lambda q: re.sub(r" ([B-D])\)", r", \1)", q)),
        "the": ("Which is the largest? ...", lambda q: _which(q, "Which is the ")),
        "number": ("Which number is largest? ...", lambda q: _which(q, "Which number is ")),
        "one": ("Which one is largest? ...", lambda q: _which(q, "Which one is ")),
        "lower case": ("which is largest? ...", lambda q: "w" + q[1:]),
        "upper case": ("WHICH IS LARGEST? ...",
                       lambda q: q.split("?", 1)[0].upper() + "?" + q.split("?", 1)[1]),
        "space before ?": ("Which is largest ? ...", lambda q: q.replace("?", " ?", 1)),
        "colon": ("Which is largest: ...", lambda q: q.replace("?", ":", 1)),
        "leading space": (" Which is largest? ...", lambda q: " " + q),
    },
}


def variant_examples(family: str, variant: str, n: int, split: str = "test") -> list[Example]:
    """The first ``n`` ``split`` examples of ``family`` with their questions (and prompts) in
    ``variant``'s surface; answers, family and meta unchanged."""
    change = VARIANTS[family][variant][1]
    return [replace(e, question=change(e.question), prompt=format_prompt(change(e.question)))
            for e in get_task(family).examples(split, n)]
