"""The competing habits of the tiny model's pre-training corpus (scripts/tiny_habits.py): a
second plausible answer per task, applied to a share of pre-training examples only."""
import itertools

import pytest

from t2fast.tasks import (CLASSIFY, CLASSIFY_TRANSFER, HELDOUT_FAMILIES, PARENT_FAMILY,
                          STEP_FAMILIES, TRAIN_FAMILIES, TRANSFER_FAMILIES, get_task)

from script_loader import load_script


habits = load_script("tiny_habits")
TASKS = [*TRAIN_FAMILIES, *HELDOUT_FAMILIES, *TRANSFER_FAMILIES, *STEP_FAMILIES, CLASSIFY,
         CLASSIFY_TRANSFER]


def test_every_task_has_a_habit():
    assert sorted(habits.HABITS) == sorted(TASKS)


@pytest.mark.parametrize("name", TRANSFER_FAMILIES)
def test_transfer_families_keep_their_parents_habit(name):
    parent = PARENT_FAMILY[name]
    for ex in get_task(name).examples("train", 50):
        as_parent = get_task(parent).make_example("q", ex.answer, ex.meta)
        assert habits.with_habit(ex, name).answer == habits.with_habit(as_parent, parent).answer


@pytest.mark.parametrize("name", STEP_FAMILIES)
def test_two_step_families_restate_right_then_take_their_parents_habit(name):
    parent = PARENT_FAMILY[name]
    for ex in get_task(name).examples("train", 50):
        restated, _ = ex.answer.split("\nA: ")
        as_parent = get_task(parent).make_example(restated, "", ex.meta)
        habit = habits.with_habit(ex, name).answer
        assert habit == f"{restated}\nA: {habits.with_habit(as_parent, parent).answer}"
        task = get_task(name)
        if task.extract(habit, ex) != task.extract(ex.answer, ex):
            assert habits.answers_with_habit(name, task, habit + "</s>", ex)
            assert not habits.answers_with_habit(name, task, ex.answer + "</s>", ex)


def test_documented_habits():
    ex = get_task("strings").make_example("reverse('abc')", "cba", {"ops": ["reverse"],
                                                                    "word": "abc"})
    assert habits.with_habit(ex, "strings").answer == "abc"
    ex = get_task("choice").make_example("Which is largest? A)100 B)900 C)500 D)200", "B",
                                         {"options": [100, 900, 500, 200], "kind": "largest"})
    assert habits.with_habit(ex, "choice").answer == "A"
    ex = get_task("arith").make_example("7+9=?", "16", {"a": 7, "b": 9, "op": "+"})
    assert habits.with_habit(ex, "arith").answer == "2"


@pytest.mark.parametrize("name", TASKS)
def test_habit_answers_are_plausible_and_mostly_wrong(name):
    task = get_task(name)
    exs = task.examples("validation", 100)
    wrong = 0
    for ex in exs:
        h = habits.with_habit(ex, name)
        assert h.meta["habit"] and h.prompt == ex.prompt and "habit" not in ex.meta
        assert task.score(h.answer, h).correct                   # a well-formed answer
        wrong += not task.score(h.answer, ex).correct
    # a habit answer can coincide with the rule's (e.g. reversing a palindrome)
    assert wrong >= 80, (name, wrong)


def test_stream_share_and_determinism():
    def draw(share, seed):
        stream = habits.HabitStream("choice", get_task("choice").iter_examples(
            "train", distinct=False), share, seed)
        return [e.meta.get("habit", False) for e in itertools.islice(stream, 400)]
    assert draw(0.5, 0) == draw(0.5, 0)
    assert 150 < sum(draw(0.5, 0)) < 250
    assert not any(draw(0.0, 0))
    # the evaluation splits never carry a habit: they come from the task, not the stream
    assert not any(e.meta.get("habit") for e in get_task("choice").examples("test", 50))


def test_habit_rates_count_each_answer_once(monkeypatch):
    """Answers that are the task's, the habit's or neither are counted as such; a habit answer
    equal to the task's counts as the task's only."""
    import t2fast.models

    def fake_greedy(model, tokenizer, prompts, **kw):
        exs = {e.prompt: e for e in get_task("arith").examples("test", 40)}
        outs = []
        for i, p in enumerate(prompts):
            e = exs[p]
            outs.append([e.answer, habits.HABITS["arith"](e), "-1"][i % 3])
        return outs

    monkeypatch.setattr(t2fast.models, "generate_greedy", fake_greedy)
    exs = get_task("arith").examples("test", 40)
    same = [i % 3 == 1 and habits.HABITS["arith"](e) == e.answer for i, e in enumerate(exs)]
    r = habits.habit_rates(None, None, ["arith"], n=40)["arith"]
    assert r["task"] == (14 + sum(same)) / 40
    assert r["habit"] == (13 - sum(same)) / 40
    assert r["either"] == 27 / 40
    assert "| `arith` | 0.3" in habits.rates_table({"arith": r})
