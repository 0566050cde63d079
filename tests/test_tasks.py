"""Task generators of the tiny world: determinism, splits, templates, reference answers."""
import pytest

from t2fast.models.tiny import CHARACTERS
from t2fast.tasks import (CLASSIFY, CLASSIFY_LABELS, CLASSIFY_TRANSFER, FAMILY_KINDS,
                          HELDOUT_FAMILIES, OTHER, PARENT_FAMILY, SPLITS, STEP_FAMILIES, TRAIN_FAMILIES, TRANSFER_FAMILIES,
                          Example,
                          ScoreResult, classify_prompt, extract_question, format_prompt, get_task,
                          split_of, task_names)
from t2fast.tasks.steps import first_step, restated_right
from t2fast.tasks.strings import OPS

ALL = task_names()


def fresh(name, seed=1234):
    """A new task instance (bypasses get_task's cache)."""
    return type(get_task(name))(seed=seed)


def test_registry_names():
    assert len(TRAIN_FAMILIES) >= 3 and len(HELDOUT_FAMILIES) >= 3
    assert len(TRANSFER_FAMILIES) >= 3 and len(STEP_FAMILIES) >= 3
    families = TRAIN_FAMILIES + HELDOUT_FAMILIES + TRANSFER_FAMILIES + STEP_FAMILIES
    assert len(set(families)) == len(families)
    assert set(PARENT_FAMILY) == set(HELDOUT_FAMILIES + TRANSFER_FAMILIES + STEP_FAMILIES)
    assert set(PARENT_FAMILY.values()) <= set(TRAIN_FAMILIES)
    kinds = (("training", TRAIN_FAMILIES), ("held out", HELDOUT_FAMILIES),
             ("transfer", TRANSFER_FAMILIES), ("two-step", STEP_FAMILIES))
    assert FAMILY_KINDS == {f: kind for kind, fams in kinds for f in fams}
    assert CLASSIFY_LABELS == TRAIN_FAMILIES + (OTHER,)
    for name in ALL:
        assert get_task(name).name == name
    with pytest.raises(KeyError):
        get_task("no-such-task")


def test_every_bundled_task_has_its_answer_budget():
    """Evaluation, CEM, training and pre-training read one budget per task; a transfer family
    (the same answers, reworded questions) gets its training family's."""
    from t2fast.train.rollout import DEFAULT_MAX_NEW_TOKENS, max_new_tokens_for
    assert set(DEFAULT_MAX_NEW_TOKENS) == set(ALL)
    for name in TRANSFER_FAMILIES:
        assert max_new_tokens_for(name) == max_new_tokens_for(PARENT_FAMILY[name])
    assert max_new_tokens_for(CLASSIFY_TRANSFER) == max_new_tokens_for(CLASSIFY)
    assert max_new_tokens_for("arith_words", 3) == 3
    # a JSONL data set's budget goes by its kind: room for a worked solution or code
    from t2fast.tasks.registry import JSONL_KINDS
    from t2fast.train.rollout import JSONL_MAX_NEW_TOKENS
    assert set(JSONL_MAX_NEW_TOKENS) == set(JSONL_KINDS)
    assert max_new_tokens_for("gsm8k:data/test.jsonl") == 512
    assert max_new_tokens_for("arc:x.jsonl") == 32 and max_new_tokens_for("gsm8k:x", 7) == 7


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed(name):
    a = fresh(name).examples("train", 64)
    b = fresh(name).examples("train", 64)
    assert a == b
    assert [e.prompt for e in fresh(name).examples("train", 16)] == [e.prompt for e in a[:16]]
    c = fresh(name, seed=99).examples("train", 64)
    assert [e.prompt for e in a] != [e.prompt for e in c]


@pytest.mark.parametrize("name", ALL)
def test_splits_do_not_overlap(name):
    task = get_task(name)
    questions = {s: [e.question for e in task.examples(s, 400 if s == "train" else 200)]
                 for s in SPLITS}
    for s, qs in questions.items():
        assert len(set(qs)) == len(qs), f"duplicate question inside {s}"
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])
    if name not in (CLASSIFY, CLASSIFY_TRANSFER):
        for s, qs in questions.items():
            assert all(split_of(name, q) == s for q in qs)


@pytest.mark.parametrize("name", ALL)
def test_template_and_fields(name):
    task = get_task(name)
    for ex in task.examples("test", 100):
        assert isinstance(ex, Example)
        assert ex.prompt == format_prompt(ex.question)
        assert ex.prompt.startswith("Q: ") and ex.prompt.endswith("\nA: ")
        assert extract_question(ex.prompt) == ex.question
        assert len(ex.prompt) < 72
        # a two-step answer is the parent's question, then a short final answer
        final = ex.answer.split("\nA: ")[1] if name in STEP_FAMILIES else ex.answer
        assert final and "\n" not in final and len(final) <= 8
        assert set(ex.prompt + ex.answer) <= set(CHARACTERS)
        assert ex.family == (CLASSIFY if name == CLASSIFY else name)


@pytest.mark.parametrize("name", ALL)
def test_reference_answers_score_correct(name):
    task = get_task(name)
    for ex in task.examples("validation", 100):
        for gen in (ex.answer, ex.answer + "</s>", " " + ex.answer + "\nQ: junk"):
            r = task.score(gen, ex)
            assert isinstance(r, ScoreResult)
            assert r.correct and r.parsable and r.reward() == 1.0, (gen, ex)


def test_default_sizes():
    task = get_task("arith")
    assert len(task.examples("validation")) == 256
    assert task.examples("test", 0) == []
    with pytest.raises(ValueError):
        task.examples("dev", 3)


def test_arith_answers():
    for ex in get_task("arith").examples("train", 300):
        assert int(ex.answer) == eval(ex.question[:-2])  # "a+b=?" -> a+b
    for ex in get_task("arith_chain").examples("train", 300):
        assert ex.question.count("+") + ex.question.count("-") == 2
        assert int(ex.answer) == eval(ex.question[:-2])
        first, second, _ = ex.meta["terms"]
        partial = first + second if ex.meta["ops"][0] == "+" else first - second
        assert partial >= 0 and int(ex.answer) >= 0, ex.question
    exs = get_task("arith").examples("train", 300)
    answers = [int(e.answer) for e in exs]
    assert min(answers) >= 0 and any(a >= 100 for a in answers) and max(answers) <= 208
    assert {e.meta["op"] for e in exs} == set("+-")
    # a number below 200 and a digit, the digit on either side of "+"
    assert all(min(e.meta["a"], e.meta["b"]) <= 9 and max(e.meta["a"], e.meta["b"]) < 200
               for e in exs)
    assert {e.meta["a"] <= 9 < e.meta["b"] for e in exs if e.meta["op"] == "+"} == {True, False}
    # n = 500 distinct test questions exist (the question space has about 600 test questions)
    assert len({e.question for e in get_task("arith").examples("test", 512)}) == 512


def test_string_answers():
    for ex in get_task("strings").examples("train", 300):
        (op,) = ex.meta["ops"]
        assert len(ex.meta["word"]) == 3
        assert ex.question == f"{op}('{ex.meta['word']}')"
        assert ex.answer == OPS[op](ex.meta["word"])
    seen_ops = set()
    for ex in get_task("strings_compose").examples("train", 300):
        inner, outer = ex.meta["ops"]
        assert inner != outer
        assert ex.answer == OPS[outer](OPS[inner](ex.meta["word"]))
        seen_ops.add((inner, outer))
    assert len(seen_ops) == 6
    assert OPS["rotate"]("abcd") == "bcda" and OPS["sort"]("dcab") == "abcd"


def test_choice_answers():
    letters = "ABCD"
    kinds = set()
    for ex in get_task("choice").examples("train", 300):
        opts = ex.meta["options"]
        assert len(set(opts)) == 4
        pick = max(opts) if ex.meta["kind"] == "largest" else min(opts)
        assert ex.answer == letters[opts.index(pick)]
        kinds.add(ex.meta["kind"])
    assert kinds == {"largest", "smallest"}
    for ex in get_task("choice_order").examples("train", 300):
        opts = ex.meta["options"]
        assert ex.answer == letters[opts.index(min(opts))]
    # answers are spread over the letters
    counts = {l: 0 for l in letters}
    for ex in get_task("choice").examples("test", 400):
        counts[ex.answer] += 1
    assert min(counts.values()) > 50


def test_classification_task():
    task = get_task(CLASSIFY)
    exs = task.examples("test", 400)
    assert {e.answer for e in exs} == set(CLASSIFY_LABELS)
    for ex in exs:
        assert ex.question.startswith("classify: ")
        inner = ex.question[len("classify: "):]
        assert ex.meta["source_family"] == ex.answer
        if ex.answer != OTHER:
            # drawn from the same split of the source family
            assert split_of(ex.answer, inner) == "test"
        else:
            assert not any(ch.isdigit() for ch in inner)
    held = get_task("arith_chain").examples("test", 1)[0]
    assert classify_prompt(held.prompt) == f"Q: classify: {held.question}\nA: "
    assert classify_prompt(held.question) == classify_prompt(held.prompt)


def parent_question_and_answer(parent: str, meta: dict) -> tuple[str, str]:
    """The training family ``parent``'s question for ``meta`` and its answer, written out here
    independently of the task code."""
    if parent == "arith":
        a, b, op = meta["a"], meta["b"], meta["op"]
        return f"{a}{op}{b}=?", str(a + b if op == "+" else a - b)
    if parent == "strings":
        op, word = meta["ops"][0], meta["word"]
        return f"{op}('{word}')", OPS[op](word)
    o, kind = meta["options"], meta["kind"]
    q = f"Which is {kind}? " + " ".join(f"{'ABCD'[i]}){v}" for i, v in enumerate(o))
    return q, "ABCD"[o.index(max(o) if kind == "largest" else min(o))]


@pytest.mark.parametrize("name", TRANSFER_FAMILIES)
def test_transfer_family_keeps_its_parents_skill_with_another_surface(name):
    """Every transfer question is a question of its parent family (same meta, same answer)
    written differently: the parent's own question for that meta has the same answer."""
    parent = get_task(PARENT_FAMILY[name])
    exs = get_task(name).examples("test", 200)
    surfaces = {e.question for e in parent.examples("test", 200)}
    for ex in exs:
        q, answer = parent_question_and_answer(parent.name, ex.meta)
        assert ex.answer == answer
        assert parent.question_of(ex.meta) == q != ex.question
    # a surface of its own: no transfer question is a parent question
    assert not {e.question for e in exs} & surfaces
    # every kind of question of the parent appears (operations, extremes)
    kinds = {str(e.meta.get("op") or e.meta.get("ops") or e.meta.get("kind")) for e in exs}
    assert len(kinds) >= 2


def test_examples_of_transfer_families():
    assert get_task("arith_words").make_example("what is 147 plus 8?", "155").prompt == \
        "Q: what is 147 plus 8?\nA: "
    q = [e.question for e in get_task("strings_words").examples("train", 50)]
    assert all(s.split(" the letters of ")[0] in OPS for s in q)
    q = [e.question for e in get_task("choice_words").examples("train", 50)]
    assert {s.split(" number:")[0] for s in q} == {"Pick the highest", "Pick the lowest"}


@pytest.mark.parametrize("name", STEP_FAMILIES)
def test_two_step_family_restates_its_word_question_as_the_parents(name):
    """A two-step question is the word transfer family's question behind ``step by step:``; its
    answer is the parent's question for the same meta, then the parent's answer; only that
    final answer is scored."""
    words = get_task(name.replace("_steps", "_words"))
    parent = get_task(PARENT_FAMILY[name])
    task = get_task(name)
    for ex in task.examples("test", 100):
        assert ex.question == "step by step: " + words.question_of(ex.meta)
        restated, final = ex.answer.split("\nA: ")
        assert (restated, final) == parent_question_and_answer(parent.name, ex.meta)
        assert restated == parent.question_of(ex.meta) == ex.meta["restated"]
        assert task.score(ex.answer + "</s>", ex).correct           # the whole two-step answer
        assert task.score(f"{restated}\nA: {final}", ex).extracted == final
        assert task.score(final, ex).correct                        # a final answer alone counts
        wrong = {"arith_steps": "-1", "strings_steps": "zzzz", "choice_steps": "E"}[name]
        assert not task.score(f"{restated}\nA: {wrong}", ex).correct
        # the restatement is not what is read: a right restatement with a wrong answer fails
        if name != "choice_steps":
            assert not task.score(f"{restated}\nA: {restated}", ex).correct
        assert restated_right(ex.answer + "</s>", ex) and restated_right(f"{restated}\nA: x", ex)
        assert not restated_right(final, ex) and not restated_right(f"{restated}x\nA: {final}", ex)
        assert first_step(f" {restated} \nA: {final}\nQ: y\nA: z") == restated
        assert first_step(final) is None and first_step(f"\nA: {final}") is None


def test_examples_of_two_step_families():
    ex = get_task("arith_steps").examples("train", 1)[0]
    assert ex.prompt.startswith("Q: step by step: what is ")
    assert get_task("strings_steps").score("sort('kdf')\nA: dfk</s>", get_task(
        "strings_steps").make_example("step by step: sort the letters of kdf",
                                      "sort('kdf')\nA: dfk")).correct


def test_classify_transfer_labels_transfer_questions_with_their_parent():
    task = get_task(CLASSIFY_TRANSFER)
    assert task.labels == CLASSIFY_LABELS
    exs = task.examples("test", 300)
    sources = {e.meta["source_family"] for e in exs}
    assert sources == set(TRANSFER_FAMILIES) | {OTHER}
    for e in exs:
        src = e.meta["source_family"]
        assert e.answer == (OTHER if src == OTHER else PARENT_FAMILY[src])
        if src != OTHER:                           # the inner question is of that split
            assert split_of(src, e.question[len("classify: "):]) == "test"
    # the classify task itself still draws the training families only
    assert {e.meta["source_family"] for e in get_task(CLASSIFY).examples("test", 300)} == \
        set(CLASSIFY_LABELS)


def test_the_package_docstring_example_runs_as_written():
    import doctest

    import t2fast.tasks

    result = doctest.testmod(t2fast.tasks)
    assert result.attempted >= 5 and result.failed == 0
