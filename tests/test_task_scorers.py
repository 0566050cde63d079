"""Table-driven tests of the scorers (the same code gives RL rewards and evaluation)."""
from decimal import Decimal

import pytest

from t2fast.tasks import Example, ScoreResult, format_prompt, get_task
from t2fast.tasks.extract import (extract_choice, extract_last_number, extract_short_number,
                                  parse_number)


def ex(name, question, answer, **meta):
    return Example(prompt=format_prompt(question), answer=answer, family=name, question=question, meta=meta)


# (generation, reference, correct, parsable)
ARITH = [
    ("432", "432", True, True),
    (" 432", "432", True, True),
    ("432</s>", "432", True, True),
    ("432\nQ: 1+1=?", "432", True, True),
    ("0432", "432", True, True),            # leading zeros
    ("+432", "432", True, True),
    ("432.0", "432", True, True),
    ("1,234", "1234", True, True),          # thousands separator
    ("-17", "-17", True, True),             # negatives
    ("\u221217", "-17", True, True),        # unicode minus
    ("-007", "-7", True, True),
    ("17", "-17", False, True),             # lost sign
    ("-17", "17", False, True),
    ("-0", "0", True, True),
    ("0", "0", True, True),
    ("432 apples", "432", True, True),      # extra text
    ("The answer is 432.", "432", True, True),
    ("answer: 432", "432", True, True),
    ("347+85=432", "432", True, True),      # echoed equation
    ("431", "432", False, True),
    ("4320", "432", False, True),
    ("43", "432", False, True),
    ("431 or 432", "432", False, True),     # several candidates: the first counts
    ("432 or 431", "432", True, True),
    ("999\n432", "432", False, True),       # only the first line is the answer
    ("", "432", False, False),
    ("   ", "432", False, False),
    ("abc", "432", False, False),
    ("\n432", "432", True, True),           # leading blank line skipped
    ("A: 432", "432", True, True),
]


@pytest.mark.parametrize("gen,ref,correct,parsable", ARITH)
def test_arith_scorer(gen, ref, correct, parsable):
    for name in ("arith", "arith_chain"):
        r = get_task(name).score(gen, ex(name, "1+1=?", ref))
        assert (r.correct, r.parsable) == (correct, parsable), (name, gen, r)


STRINGS = [
    ("afdk", "afdk", True, True),
    (" afdk</s>", "afdk", True, True),
    ("'afdk'", "afdk", True, True),
    ('"afdk"', "afdk", True, True),
    ("afdk.", "afdk", True, True),
    ("afdk afdk", "afdk", True, True),
    ("afdk\nbbb", "afdk", True, True),
    ("answer is afdk", "afdk", True, True),
    ("AFDK", "afdk", False, True),          # checked exactly, case included
    ("afd", "afdk", False, True),
    ("afdkx", "afdk", False, True),
    ("kdfa", "afdk", False, True),
    ("dfk afdk", "afdk", False, True),      # first candidate counts
    ("", "afdk", False, False),
    ("12", "afdk", False, False),
    ("a1b", "afdk", False, False),
]


@pytest.mark.parametrize("gen,ref,correct,parsable", STRINGS)
def test_strings_scorer(gen, ref, correct, parsable):
    for name in ("strings", "strings_compose"):
        r = get_task(name).score(gen, ex(name, "reverse('kdfa')", ref))
        assert (r.correct, r.parsable) == (correct, parsable), (name, gen, r)


CHOICE = [
    ("B", True, True),
    (" B</s>", True, True),
    ("B)", True, True),
    ("(B)", True, True),
    ("B.", True, True),
    ("B) 71", True, True),
    ("71", True, True),                     # the option's value instead of its letter
    ("The answer is B", True, True),
    ("Answer: (B)", True, True),
    ("A", False, True),
    ("34", False, True),                    # value of option A
    ("A or B", False, True),                # several candidates: the first counts
    ("B or A", True, True),
    ("E", False, False),                    # not an option
    ("b", False, False),                    # letters are upper case
    ("BA", False, False),
    ("", False, False),
    ("\nB", True, True),
]


@pytest.mark.parametrize("gen,correct,parsable", CHOICE)
def test_choice_scorer(gen, correct, parsable):
    e = ex("choice", "Which is largest? A)34 B)71 C)12 D)55", "B", options=[34, 71, 12, 55], kind="largest")
    r = get_task("choice").score(gen, e)
    assert (r.correct, r.parsable) == (correct, parsable), (gen, r)


def test_choice_order_scorer():
    e = ex("choice_order", "Which is first alphabetically? A)kot B)mun C)ant D)zeb", "C",
           options=["kot", "mun", "ant", "zeb"])
    task = get_task("choice_order")
    assert task.score("C", e).correct
    assert task.score("ant", e).correct
    assert not task.score("A", e).correct
    assert not task.score("xyz", e).parsable


CLASSIFY = [
    ("arith", "arith", True, True),
    ("Arith", "arith", True, True),
    ("arith.", "arith", True, True),
    (" arith</s>", "arith", True, True),
    ("strings", "arith", False, True),
    ("other", "other", True, True),
    ("others", "other", True, True),       # the paper's label spelling
    ("math", "arith", False, False),
    ("", "choice", False, False),
    ("choice strings", "choice", True, True),
]


@pytest.mark.parametrize("gen,ref,correct,parsable", CLASSIFY)
def test_classify_scorer(gen, ref, correct, parsable):
    r = get_task("classify").score(gen, ex("classify", "classify: 1+1=?", ref))
    assert (r.correct, r.parsable) == (correct, parsable), (gen, r)


def test_rewards():
    assert ScoreResult(True, True).reward() == 1.0
    assert ScoreResult(True, True).reward(-0.1) == 1.0
    assert ScoreResult(False, True).reward() == -1.0
    assert ScoreResult(False, True).reward(unparsable_penalty=-0.1) == -1.0
    assert ScoreResult(False, False).reward() == -1.0
    assert ScoreResult(False, False).reward(unparsable_penalty=-0.1) == pytest.approx(-0.1)
    task = get_task("arith")
    e = ex("arith", "2+2=?", "4")
    assert task.score("4", e).reward() == 1.0
    assert task.score("5", e).reward(-0.1) == -1.0
    assert task.score("?", e).reward(-0.1) == pytest.approx(-0.1)


@pytest.mark.parametrize("text,value", [
    ("1,234", Decimal(1234)), ("-007", Decimal(-7)), ("\u22125", Decimal(-5)), ("3.50", Decimal("3.5")),
    ("$12", Decimal(12)), ("12.", Decimal(12)), ("-0", Decimal(0)), ("abc", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("gen,expected", [
    ("She has 3 apples and buys 4, so 7 in total.", "7"),
    ("3 + 4 = 7. The answer is 7", "7"),
    ("The answer is 1,250 dollars. Check: 1250 = 1000 + 250", "1,250"),
    ("The answer is: $-12.", "-12"),
    ("no number here", None),
    # a marker followed by words is no answer: the last number is (it took the first after it)
    ("Answer: Tom has 3 apples and buys 4 more, so he has 7.", "7"),
    ("The answer is found by adding 3 and 4, which gives 7.", "7"),
    ("The answer isn't 8; 3 + 4 = 7. So 7.", "7"),
    ("The answer is -$5.", "-5"), ("The answer is \u20135", "-5"),   # sign forms (was 5)
    ("Between 3\u20135 of them; the answer is 4", "4"),
])
def test_last_number(gen, expected):
    assert extract_last_number(gen) == expected


@pytest.mark.parametrize("gen,expected", [
    ("12", "12"), ("x = 5", "5"), ("answer is -3", "-3"), ("", None), ("nothing", None),
])
def test_short_number(gen, expected):
    assert extract_short_number(gen) == expected


@pytest.mark.parametrize("gen,labels,expected", [
    ("C", "ABCD", "C"), ("(C) because", "ABCD", "C"), ("I think A. No, the answer is D", "ABCD", "D"),
    ("3", "1234", "3"), ("E", "ABCDE", "E"), ("BAD", "ABCD", None),
])
def test_extract_choice(gen, labels, expected):
    assert extract_choice(gen, labels, whole=True) == expected
