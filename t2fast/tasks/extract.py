"""Answer extraction shared by the bundled families and the JSONL adapters.

Every function takes the raw generated text and returns the extracted answer, or None when no
answer of the expected form is present (the "unparsable" case).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .base import answer_line

# An integer or decimal, optional sign (ASCII or Unicode minus), optional thousands commas.
_NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?\d+(?:,\d{3})*(?:\.\d+)?|(?<![\w.])[-+\u2212]?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*", re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """``"1,234"`` -> 1234, ``"-007"`` -> -7, ``"\u22125"`` -> -5, ``"3.50"`` -> 3.5; None if not a
    number."""
    t = text.strip().replace("\u2212", "-").replace(",", "").rstrip(".")
    if t.startswith("$"):
        t = t[1:]
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return value.normalize() if value != 0 else Decimal(0)


def find_numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text)]


def after_answer_marker(text: str) -> str | None:
    """The text after the last "answer is" / "answer:" marker, if any."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    return text[matches[-1].end():]


def extract_short_number(generation: str) -> str | None:
    """Number answer of a bundled arithmetic family.

    Reads the answer line (up to the first newline / end of sequence). If it says "answer is X"
    the number after the marker wins; otherwise, if it contains "=", the first number after the
    last "="; otherwise the first number of the line.
    """
    line = answer_line(generation)
    marked = after_answer_marker(line)
    if marked is not None:
        line = marked
    elif "=" in line:
        line = line.rsplit("=", 1)[1]
    nums = find_numbers(line)
    return nums[0] if nums else None


#: A sign written before a currency sign or as a dash (``-$5``, ``–5``): read as a minus.
_SIGN_FORMS = re.compile(r"(?<![\w.])(?:[-\u2212\u2013]\s?\$|\u2013)(?=\d)")


def extract_last_number(generation: str) -> str | None:
    """GSM8K-style extraction (the paper's math scorer): the number right after the last
    "The answer is" / "answer:" marker (``$`` and spaces between them allowed), else the last
    number anywhere in the generation (a marker followed by words, "the answer is found by
    adding 3 and 4: 7", does not take the first number after it)."""
    text = _SIGN_FORMS.sub("-", generation)
    marked = after_answer_marker(text)
    if marked is not None:
        first = _NUMBER.match(marked.lstrip(" $"))
        if first:
            return first.group(0)
    nums = find_numbers(text)
    return nums[-1] if nums else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


#: Punctuation around a one-word answer.
WORD_STRIP = "\"'`.,;:!?()[]{}"
#: After a bare "A": a lower-case word that makes it the article ("A good choice is C"), not
#: a verb or conjunction that makes it option A ("A is correct", "A or B").
_ARTICLE = re.compile(r" (?!(?:is|was|seems|looks|appears|would|should|could|must|might|"
                      r"and|or|but|because|since|as|fits|matches|works)\b)[a-z]")


def extract_word(generation: str) -> str | None:
    """First whitespace-separated token of the answer line, without surrounding quotes or
    punctuation; None when the line is empty."""
    line = answer_line(generation)
    marked = after_answer_marker(line)
    if marked is not None:
        line = marked
    for token in line.split():
        token = token.strip(WORD_STRIP)
        if token:
            return token
    return None


def extract_choice(generation: str, labels: str | list[str] = "ABCD",
                   option_texts: list[str] | None = None, whole: bool = False) -> str | None:
    """Letter (or label) of a multiple-choice answer.

    In order: "answer is X" / "answer: (X)"; the whole answer line equal to one option's text
    (the model wrote the value instead of its letter); the first standalone label, e.g. "B",
    "(B)", "B)", "B.". ``whole`` searches the whole generation instead of the answer line (for
    free-form answers to real data sets); there a label after the answer marker may be lower
    case ("Answer: c"), and an "A" that reads as the article ("A good choice is C") gives way
    to a later label. Several candidates: the first one wins.
    """
    labels = list(labels)
    text = generation if whole else answer_line(generation)
    alternation = "|".join(re.escape(l) for l in sorted(labels, key=len, reverse=True))
    standalone = re.compile(rf"(?<![A-Za-z0-9])\(?({alternation})\)?(?![A-Za-z0-9])")
    marked = after_answer_marker(text)
    if marked is not None:
        m = standalone.match(marked.strip())
        if m:
            return m.group(1)
        if whole:      # "Answer: c" (alone: "the answer is a mammal" names no option)
            by_upper = {l.upper(): l for l in labels}
            m = re.match(r"\(?([A-Za-z0-9]+)\)?\s*(?:$|[.!)])", marked.strip())
            if m and m.group(1).upper() in by_upper:
                return by_upper[m.group(1).upper()]
    if option_texts is not None:
        stripped = text.strip().strip(WORD_STRIP)
        for label, option in zip(labels, option_texts):
            if stripped and stripped == str(option).strip():
                return label
    found = list(standalone.finditer(text))
    if whole and len(found) > 1 and found[0].group(0) == "A" and _ARTICLE.match(
            text, found[0].end()):
        found = found[1:]                               # the article, not option A
    return found[0].group(1) if found else None
