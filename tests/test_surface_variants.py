"""Surface variants (scripts/surface_variants.py): each changes only the question's surface,
keeps the answer, and draws from the parent family's test split."""
import re

import pytest

from t2fast.tasks import extract_question, get_task, split_of

from script_loader import load_script

sv = load_script("surface_variants")
#: Each family's example question (its module docstring's).
CANONICAL = {"arith": "147+8=?", "strings": "reverse('kdf')",
             "choice": "Which is largest? A)347 B)712 C)128 D)550"}
CASES = [(f, v) for f, vs in sv.VARIANTS.items() for v in vs]


def content(family: str, question: str) -> tuple:
    """What a question asks, read back from its text independently of the transforms: the
    numbers and operators (arith), the operation and word (strings), the extreme and the
    options with their labels (choice)."""
    if family == "arith":
        return [int(x) for x in re.findall(r"\d+", question)], re.findall(r"[+-]", question)
    if family == "strings":
        op, word = re.fullmatch(r"\s*(?:compute )?(\w+) ?\( ?['\"]?(\w+)['\"]? ?\)\W*",
                                question).groups()
        return op.lower(), word
    kind = re.search(r"largest|smallest", question.lower()).group()
    return kind, re.findall(r"([A-D])\) ?(\d+)", question)


@pytest.mark.parametrize("family,variant", CASES)
def test_variant_changes_the_surface_only(family, variant):
    originals = get_task(family).examples("test", 40)
    changed = sv.variant_examples(family, variant, 40)
    example, transform = sv.VARIANTS[family][variant]
    for o, c in zip(originals, changed):
        assert split_of(family, o.question) == "test"
        assert (c.answer, c.family, c.meta) == (o.answer, o.family, o.meta)
        assert extract_question(c.prompt) == c.question.strip()
        assert c.question == transform(o.question)
        assert content(family, c.question) == content(family, o.question), c.question
        if variant == "as trained":
            assert c == o
        else:
            assert c.question != o.question
    # the documented example is what the transform makes of the family's own example
    assert transform(CANONICAL[family]).startswith(example.removesuffix(" ..."))

def test_every_family_has_variants():
    assert set(sv.VARIANTS) == {"arith", "strings", "choice"}
    assert all(len(v) >= 8 and "as trained" in v for v in sv.VARIANTS.values())
