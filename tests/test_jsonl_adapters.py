"""Adapters for user-supplied JSONL data sets, on small fixture files."""
import json
import pathlib
import sys
import time

import pytest

from t2fast.tasks import SPLITS, get_task
from t2fast.tasks.jsonl import (ALLOW_CODE_ENV, ARCTask, GSM8KTask, HumanEvalTask, MBPPTask,
                                extract_code, gsm8k_reference, load_jsonl_task, read_jsonl,
                                run_python)

FIX = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv(ALLOW_CODE_ENV, "1")


def test_read_jsonl_reports_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        read_jsonl(bad)


def test_gsm8k_examples_and_references():
    task = GSM8KTask(FIX / "gsm8k_sample.jsonl", split="test")
    exs = task.examples("test")
    assert [e.answer for e in exs] == ["7", "1250", "-7", "10"]
    assert task.examples("train") == [] and len(task) == 4
    assert exs[0].prompt.startswith("Q: Tom has 3 apples") and exs[0].prompt.endswith("\nA: ")
    assert "The answer is" in exs[0].prompt
    with pytest.raises(ValueError):
        gsm8k_reference("no final answer")


@pytest.mark.parametrize("i,gen,correct,parsable", [
    (0, "3 + 4 = 7. The answer is 7.", True, True),
    (0, "He has 3 and buys 4 so he has 7", True, True),
    (0, "The answer is 7. Check: 7 - 4 = 3", True, True),   # marker wins over the last number
    (0, "3 + 4 = 8", False, True),
    (0, "I do not know", False, False),
    (1, "The answer is $1,250.", True, True),
    (1, "625 * 2 = 1250.00", True, True),
    (2, "5 - 12 = -7", True, True),
    (2, "It is 7 degrees", False, True),
    (3, "2.5 * 4 = 10.0", True, True),
    (0, "so 7 in all.\n\nQ: Tom has 5 apples", True, True),   # the next question it writes
    (0, "He has 7 apples.\nQuestion: Sara has 2 pens", True, True),     # in another form
])
def test_gsm8k_scoring(i, gen, correct, parsable):
    task = GSM8KTask(FIX / "gsm8k_sample.jsonl", split="test")
    r = task.score(gen, task.examples("test")[i])
    assert (r.correct, r.parsable) == (correct, parsable), r


def test_arc_both_layouts():
    task = ARCTask(FIX / "arc_sample.jsonl", split="test")
    exs = task.examples("test")
    assert [e.answer for e in exs] == ["B", "A", "2", "C"]
    assert "B) the Sun" in exs[0].prompt and "C) salt" in exs[1].prompt
    assert exs[2].meta["labels"] == ["1", "2", "3", "4"]
    assert exs[3].meta["labels"][-1] == "E"
    assert exs[0].prompt.endswith("Answer with the letter of the correct option.\nA: ")
    assert exs[2].prompt.endswith("Answer with the number of the correct option.\nA: ")


def test_arc_option_text_with_a_capital_letter_is_that_option(tmp_path):
    """ "vitamin D" is option B's text, not label D."""
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"id": "v", "question": "Which vitamin does sunlight make?",
                             "choices": {"label": list("ABCD"), "text": [
                                 "vitamin A", "vitamin D", "vitamin C", "vitamin K"]},
                             "answerKey": "B"}) + "\n")
    task = ARCTask(f, split="test")
    ex = task.examples("test")[0]
    for gen in ("vitamin D", "The answer is vitamin D.", "Vitamin d"):
        assert task.score(gen, ex).correct, gen
    assert not task.score("vitamin C", ex).correct


@pytest.mark.parametrize("i,gen,correct,parsable", [
    (0, "B", True, True),
    (0, "The answer is B.", True, True),
    (0, "(B) the Sun", True, True),
    (0, "I think C", False, True),
    (0, "the Sun", True, True),          # option text instead of its letter
    (0, "no idea", False, False),
    (2, "2", True, True),                # numeric labels
    (2, "The answer is 3", False, True),
    (3, "E", False, True),
    (3, "Answer: C) solid", True, True),
    (0, "A good choice is B.", True, True),   # the article A, then the label
    (1, "A is right", True, True),            # option A, no other label
    (0, "Answer: b", True, True),             # a lower-case label after the marker
    (0, "B\nQ: Which is A) big", True, True),  # the next question it writes is not its answer
    (0, "The Sun", True, True), (0, "The answer is the Sun.", True, True),   # text, any case
    (2, "B", True, True), (2, "The answer is B", True, True),   # the second of options 1-4
])
def test_arc_scoring(i, gen, correct, parsable):
    task = ARCTask(FIX / "arc_sample.jsonl", split="test")
    r = task.score(gen, task.examples("test")[i])
    assert (r.correct, r.parsable) == (correct, parsable), r


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"   # unterminated fence


def test_mbpp_scoring(allow_code):
    task = MBPPTask(FIX / "mbpp_sample.jsonl", split="test")
    add, rev = task.examples("test")
    assert "assert add(1, 2) == 3" in add.prompt
    assert task.score(add.answer, add).correct
    assert task.score("```python\ndef add(a, b):\n    return b + a\n```", add).correct
    r = task.score("def add(a, b):\n    return a - b", add)
    assert r.parsable and not r.correct
    r = task.score("def add(a, b) return", add)
    assert not r.parsable and not r.correct
    assert not task.score("", add).parsable
    assert task.score("def rev(s):\n    return ''.join(reversed(s))", rev).correct
    # the next question the model goes on to write is not code
    assert task.score("def add(a, b):\n    return a + b\n\nQ: Write a function", add).correct


def test_humaneval_scoring(allow_code):
    task = HumanEvalTask(FIX / "humaneval_sample.jsonl", split="test")
    double, even = task.examples("test")
    assert double.prompt.startswith("def double")
    assert task.score(double.answer, double).correct                  # completion of the prompt
    assert task.score("def double(x):\n    return x + x\n", double).correct   # whole function
    assert not task.score("    return x * 3\n", double).correct
    assert task.score(even.answer, even).correct


@pytest.mark.parametrize("escape", ["import sys\nsys.exit(0)", "exit()", "raise SystemExit",
                                    "import os\nos._exit(0)",
                                    "import atexit, os\natexit.register(os._exit, 0)"])
def test_code_that_exits_before_the_tests_end_fails(allow_code, escape):
    """Exit status 0 alone passed code that left before (or in spite of) the tests: an RL
    reward for exiting early."""
    mbpp = MBPPTask(FIX / "mbpp_sample.jsonl", split="test")
    add = mbpp.examples("test")[0]
    assert not mbpp.score(f"def add(a, b):\n    return 0\n{escape}\n", add).correct
    humaneval = HumanEvalTask(FIX / "humaneval_sample.jsonl", split="test")
    double = humaneval.examples("test")[0]
    body = "\n".join("    " + line for line in escape.splitlines())
    assert not humaneval.score(f"{body}\n", double).correct
    assert humaneval.score(double.answer, double).correct


def test_humaneval_timeout(allow_code):
    task = HumanEvalTask(FIX / "humaneval_sample.jsonl", split="test")
    task.timeout = 2.0
    even = task.examples("test")[1]
    r = task.score("    while True:\n        pass\n", even)
    assert r.parsable and not r.correct


def test_hashed_splits_and_registry():
    path = FIX / "gsm8k_sample.jsonl"
    task = load_jsonl_task("gsm8k", path)
    got = [e.question for s in SPLITS for e in task.examples(s)]
    assert sorted(got) == sorted(e.question for e in GSM8KTask(path, split="test").examples("test"))
    t2 = get_task(f"gsm8k:{path}")
    assert isinstance(t2, GSM8KTask) and t2.split is None
    assert isinstance(get_task(f"arc:{FIX / 'arc_sample.jsonl'}"), ARCTask)
    with pytest.raises(KeyError):
        load_jsonl_task("squad", path)


def test_code_tasks_refuse_to_load_unless_code_execution_is_allowed(monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    for kind in ("mbpp", "humaneval"):
        with pytest.raises(ValueError, match=f"scoring {kind} runs model-written Python.*"
                                             f"{ALLOW_CODE_ENV}=1"):
            get_task(f"{kind}:{FIX / f'{kind}_sample.jsonl'}")
    monkeypatch.setenv(ALLOW_CODE_ENV, "yes")           # only "1" allows it
    with pytest.raises(ValueError, match=ALLOW_CODE_ENV):
        MBPPTask(FIX / "mbpp_sample.jsonl", split="test")


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_run_python_leaves_no_process_of_its_group_behind(tmp_path):
    """A program that starts a child and then hangs: after the time limit neither lives on."""
    flag = tmp_path / "alive"
    program = (f"import subprocess, sys\n"
               f"subprocess.Popen([sys.executable, '-c', 'import time, pathlib; time.sleep(2); "
               f"pathlib.Path({str(flag)!r}).write_text(\"x\")'])\n"
               f"while True:\n    pass\n")
    assert run_python(program, timeout=1.0) is False
    time.sleep(2.5)
    assert not flag.exists()
    assert run_python("import sys\nsys.exit(0)\n") and not run_python("raise SystemExit(3)\n")


GOOD_GSM = {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}
GOOD_ARC = {"question": "Pick B", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
            "answerKey": "B"}


@pytest.mark.parametrize("kind, record, message", [
    ("gsm8k", {"question": "x"}, "missing field 'answer'"),
    ("gsm8k", {"question": 5, "answer": "#### 5"}, "field 'question' must be str, got int"),
    ("gsm8k", {"question": None, "answer": "#### 5"}, "field 'question' must be str"),
    ("gsm8k", ["a list"], "expected a JSON object, got list"),
    ("gsm8k", {"question": "x", "answer": "5"}, "no '####'"),
    ("gsm8k", {"question": "x", "answer": "#### 18 dollars"}, "not a number: '18 dollars'"),
    ("gsm8k", {"question": "x", "answer": "#### "}, "not a number: ''"),
    ("arc", GOOD_GSM, "missing field 'choices'"),
    ("arc", {**GOOD_ARC, "choices": {"text": "ab", "label": ["A", "B"]}},
     "field 'text' must be a non-empty list"),
    ("arc", {**GOOD_ARC, "choices": {"text": ["a"], "label": ["A", "B"]}},
     "2 option labels but 1 option texts"),
    ("arc", {**GOOD_ARC, "answerKey": "C"}, "answerKey 'C' not among"),
    ("mbpp", {"text": "add", "test_list": []}, "field 'test_list' must be a non-empty list"),
    ("mbpp", {"text": "add", "test_list": "assert f()"}, "field 'test_list' must be a non-empty"),
    ("humaneval", {"prompt": "def f():", "test": "x"}, "missing field 'entry_point'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, allow_code, kind, record, message):
    path = tmp_path / f"{kind}.jsonl"
    good = {"gsm8k": GOOD_GSM, "arc": GOOD_ARC, "mbpp": {"text": "t", "test_list": ["assert 1"]},
            "humaneval": {"prompt": "def f():", "test": "x", "entry_point": "f"}}[kind]
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as err:
        get_task(f"{kind}:{path}")
    assert str(err.value).startswith(f"{path}:3: {kind} record: "), err.value
    assert message in str(err.value)


def test_conflicting_duplicates_and_encoding_are_located(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(GOOD_GSM) + "\n" + json.dumps({**GOOD_GSM,
                                                              "answer": "#### 6"}) + "\n")
    with pytest.raises(ValueError, match=r"dup.jsonl:2: gsm8k record: the question of line 1 "
                                         r"again, with another answer \('6', not '5'\)"):
        GSM8KTask(path, split="test")
    path.write_text(json.dumps(GOOD_GSM) + "\n" + json.dumps(GOOD_GSM) + "\n")  # same answer
    assert len(GSM8KTask(path, split="test")) == 2
    path.write_bytes(json.dumps(GOOD_GSM).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"dup.jsonl:2: not UTF-8"):
        GSM8KTask(path, split="test")


def test_a_whole_file_as_one_split(tmp_path):
    """``KIND@SPLIT:FILE``: every record in that split (the standard GSM8K test set is one
    file), none in the others; ``KIND:FILE`` divides it by hash."""
    from t2fast.tasks.registry import is_task_name, jsonl_spec
    from t2fast.train.rollout import max_new_tokens_for

    path = FIX / "gsm8k_sample.jsonl"
    whole = get_task(f"gsm8k@test:{path}")
    assert len(whole.examples("test")) == len(read_jsonl(path)) == 4
    assert whole.examples("train") == [] and whole.split == "test"
    assert jsonl_spec(f"gsm8k:{path}") == ("gsm8k", None, str(path))
    assert max_new_tokens_for(f"gsm8k@test:{path}") == max_new_tokens_for(f"gsm8k:{path}")
    for bad in (f"gsm8k@dev:{path}", "gsm8k@test:", "arith@test:x", "nope:x", 3):
        assert jsonl_spec(bad) is None and not is_task_name(bad)
    with pytest.raises(KeyError, match="KIND@SPLIT:FILE"):
        get_task(f"gsm8k@dev:{path}")


@pytest.mark.parametrize("gen, label", [
    ("The answer is a mammal, so C.", "C"),    # the article after the marker is no label
    ("The answer is a: C", "C"),
    ("(A) is correct, B is not.", "A"),        # option A, written as such
    ("A is correct; B is wrong.", "A"),
    ("A good choice is C.", "C"),              # the article, then the label
    ("Answer: c", "C"), ("The answer is d.", "D"),
    ("A or B? A", "A"),
])
def test_free_form_choice_extraction(gen, label):
    from t2fast.tasks.extract import extract_choice
    assert extract_choice(gen, list("ABCD"), None, whole=True) == label


def test_budgets_by_the_tasks_own_name_and_numpy_eos():
    """eval, adapt and CEM ask the budget of ``task.name`` (``gsm8k``), not of the name given
    on the command line; decode_n_tokens takes an eos id of any integer type."""
    import numpy as np
    import torch

    from t2fast.generation import decode_n_tokens
    from t2fast.train.rollout import max_new_tokens_for

    task = get_task(f"gsm8k@test:{FIX / 'gsm8k_sample.jsonl'}")
    assert max_new_tokens_for(task.name) == max_new_tokens_for(f"gsm8k:{FIX}") == 512
    logits = torch.zeros(1, 5)
    logits[0, 3] = 1.0                                  # greedy picks 3 at once
    for eos in (3, np.int64(3), torch.tensor(3), [4, 3]):
        tokens, alive = decode_n_tokens(None, logits, None, torch.ones(1, 1), torch.zeros(1, 1),
                                        4, eos, 0)
        assert tokens.tolist() == [[3]] and alive.tolist() == [[True]]


def test_code_tasks_may_repeat_a_question_with_another_solution(tmp_path, allow_code):
    rec = {"text": "add", "test_list": ["assert add(1, 2) == 3"], "code": "def add(a, b): ..."}
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "code": "add = int.__add__"})
                    + "\n")
    assert len(MBPPTask(path, split="test")) == 2


def test_code_answers_in_the_forms_models_write(allow_code, tmp_path):
    """A fence written ``` python; a HumanEval completion followed by the model's own main
    block or a cut-off helper (the official stop sequences end it); a program's __main__
    block; the sanitized MBPP layout (prompt, test_imports)."""
    mbpp = MBPPTask(FIX / "mbpp_sample.jsonl", split="test")
    add = mbpp.examples("test")[0]
    assert mbpp.score("``` python\ndef add(a, b):\n    return a + b\n```", add).correct
    assert mbpp.score("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n"
                      "    print(add(int(input()), 1))\n", add).correct
    humaneval = HumanEvalTask(FIX / "humaneval_sample.jsonl", split="test")
    double = humaneval.examples("test")[0]
    for tail in ("\n\n\ndef main():\n    print(double(", "\nif __name__ == '__main__':\n"
                 "    x = int(input())\n"):
        assert humaneval.score(double.answer + tail, double).correct, tail
    f = tmp_path / "sanitized.jsonl"
    f.write_text(json.dumps({"task_id": 1, "prompt": "Write a function for the area of a "
                             "circle.", "code": "import math\ndef area(r):\n    return "
                             "math.pi * r * r", "test_imports": ["import math"],
                             "test_list": ["assert math.isclose(area(1), math.pi)"]}) + "\n")
    task = MBPPTask(f, split="test")
    ex = task.examples("test")[0]
    assert ex.question.startswith("Write a function for the area of a circle.")
    assert task.score("def area(r):\n    return 3.141592653589793 * r * r", ex).correct
