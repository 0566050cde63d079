"""Prompt / classifier dispatch (parsing, base weights in pass 1, fallback to the base model on
"other") and the two-pass engine (per-row experts in one batch)."""
import pytest
import torch

import t2fast
from t2fast.adapt import (ClassifierDispatch, FixedMixture, PromptDispatch, TwoPassEngine,
                          paper_style_prompt, parse_category, tiny_world_prompt, uniform_alpha)
from t2fast.adapt import prompt as prompt_mod
from t2fast.experts import Expert
from t2fast.models import build_char_tokenizer, random_tiny_llama
from t2fast.train.rollout import generate

LABELS = ["arith", "strings", "choice"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,expected", [
    ("arith", "arith"), ("Arith.", "arith"), ("  strings</s>", "strings"), ("'choice'", "choice"),
    ("Category: choice", "choice"), ("the answer is strings", "strings"), ("choices", "choice"),
    ("string", "strings"), ("arit", "arith"), ("I think it is strings, not arith", "strings"),
    ("other", "other"), ("Others", "other"), ("none", "other"), ("", "other"),
    ("xyz", "other"), ("ar", "other"), ("reverse\narith", "other"), ("42", "other"),
])
def test_parse_category(text, expected):
    assert parse_category(text, LABELS) == expected


def test_prompt_templates():
    assert tiny_world_prompt("Q: 1+2=?\nA: ", LABELS) == "Q: classify: 1+2=?\nA: "
    p = paper_style_prompt("What is 1+2?", LABELS)
    assert "'arith', 'strings', 'choice'" in p and "'other'" in p and "What is 1+2?" in p


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = random_tiny_llama(5, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2,
                              initializer_range=0.1)
    handle = t2fast.patch_model(model, backend="torch", progress=False, cache_dir=False)
    f = handle.decomposition.factors
    handle.add_experts([Expert.random(n, f, scale=0.5, seed=i)
                        for i, n in enumerate(LABELS + ["classify"])])
    return handle, tok


def _stub_pass1(monkeypatch, handle, answers, seen):
    """Replace pass-1 generation by fixed answers; record which weights were active."""
    def fake(model, tok, prompts, **kw):
        layer = next(iter(handle.modules.values()))
        seen.append({"prompts": list(prompts), "merged": layer.dense_weight(),
                     "original": handle._originals[layer.name].weight})
        return list(answers)[:len(prompts)]
    monkeypatch.setattr(prompt_mod, "generate_texts", fake)


def test_dispatch_falls_back_to_base_on_other(monkeypatch, setup):
    handle, tok = setup
    seen = []
    _stub_pass1(monkeypatch, handle, ["arith", "other", "nonsense", "Strings", "choice"], seen)
    d = PromptDispatch(handle, tok, LABELS)
    handle.set_mixture("classify")                      # an expert was active before pass 1
    specs, labels = d.select(["Q: 1+2=?\nA: "] * 5)
    assert labels == ["arith", "other", "other", "strings", "choice"]
    assert specs == ["arith", None, None, "strings", "choice"]
    # pass 1 ran on the original base weights, not on the last-used expert
    assert seen[0]["merged"].data_ptr() == seen[0]["original"].data_ptr()
    assert seen[0]["prompts"][0] == "Q: classify: 1+2=?\nA: "


def test_classifier_dispatch_uses_the_classifier_for_pass1_only(monkeypatch, setup):
    handle, tok = setup
    seen = []
    _stub_pass1(monkeypatch, handle, ["strings", "other"], seen)
    d = ClassifierDispatch(handle, tok, "classify")
    assert d.labels == LABELS and "classify" not in d.categories.values()
    specs, labels = d.select(["Q: x\nA: ", "Q: y\nA: "])
    assert specs == ["strings", None]
    layer = next(iter(handle.modules.values()))
    expected = layer.merge(handle.bank.bank_z(layer.name)[1 + handle.expert_names.index("classify")])
    assert torch.allclose(seen[0]["merged"], expected)
    # pass 2 through the engine: the classifier is not used for answering
    engine = TwoPassEngine(handle, tok, max_new_tokens=3)
    res = engine.run(["Q: x\nA: ", "Q: y\nA: "], d)
    assert res.mixtures == ["strings", None] and res.pass2_paths == ["factored"]


def test_dispatch_errors(setup):
    handle, tok = setup
    with pytest.raises(ValueError, match="not loaded"):
        PromptDispatch(handle, tok, {"arith": "no-such-expert"})
    with pytest.raises(ValueError, match="fallback"):
        PromptDispatch(handle, tok, {"other": "arith"})
    with pytest.raises(ValueError, match="neither a loaded expert"):
        ClassifierDispatch(handle, tok, "missing.safetensors")
    with pytest.raises(ValueError, match="cannot also be a pass-2 expert"):
        ClassifierDispatch(handle, tok, "classify", ["arith", "classify"])


def test_engine_per_row_experts_match_running_alone(setup):
    handle, tok = setup
    prompts = ["Q: 12+5=?\nA: ", "Q: sort('dcba')\nA: ", "Q: Which is largest? A)3 B)9\nA: ",
               "Q: hello\nA: "]
    specs = ["arith", "strings", {"choice": 0.5, "arith": 0.5}, None]

    class Fixed:
        name = "test"

        def select(self, ps):
            return specs, ["a", "b", "c", "d"]

    engine = TwoPassEngine(handle, tok, max_new_tokens=5)
    res = engine.run(prompts, Fixed())
    assert res.pass2_paths == ["factored"] and res.labels == ["a", "b", "c", "d"]
    assert res.pass1_s >= 0 and res.pass2_s > 0 and res.total_s == res.pass1_s + res.pass2_s
    for p, s, out in zip(prompts, specs, res.outputs):
        handle.set_mixture(s)
        assert generate(handle.model, tok, [p], max_new_tokens=5).texts[0] == out
    handle.set_mixture(None)
    # chunked pass 2 gives the same answers
    res2 = TwoPassEngine(handle, tok, max_new_tokens=5, batch_size=3).run(prompts, Fixed())
    assert res2.outputs == res.outputs and len(res2.pass2_paths) == 2
    with pytest.raises(TypeError, match="TwoPassEngine.run: prompts must be a sequence"):
        engine.run(prompts[0], Fixed())      # before: one prompt per character
    with pytest.raises(ValueError, match="TwoPassEngine: batch_size must be a positive int"):
        TwoPassEngine(handle, tok, batch_size=-1)   # before: no answers at all


def test_fixed_mixtures(setup):
    handle, tok = setup
    prompts = ["Q: 1+1=?\nA: ", "Q: 2+2=?\nA: "]
    engine = TwoPassEngine(handle, tok, max_new_tokens=3)
    res = engine.run(prompts, FixedMixture(uniform_alpha(4), "uniform"))
    assert res.labels is None and res.pass2_paths == ["merged"]
    base = engine.run(prompts, FixedMixture(None))
    assert base.pass2_paths == ["base"]
    assert uniform_alpha(4) == [0.25] * 4
    with pytest.raises(ValueError):
        uniform_alpha(0)
    with pytest.raises(ValueError, match="no prompts"):
        engine.run([], FixedMixture(None))


def test_restated_answers_the_restated_prompts(monkeypatch, setup):
    """Restated: the base weights write each question's first step (behind the step prefix,
    never prefixed twice), the wrapped strategy picks for the restated prompts, pass 2 answers
    them; a question without a first step is answered as asked."""
    from t2fast.adapt import Restated
    from t2fast.adapt import restate as restate_mod
    handle, tok = setup
    seen, picked = [], []

    def fake(model, tok_, prompts, **kw):
        layer = next(iter(handle.modules.values()))
        seen.append({"prompts": list(prompts), "merged": layer.dense_weight(),
                     "original": handle._originals[layer.name].weight})
        return ["147+8=?\nA: 155", "no separator", "\nA: 3", "sort('ab')\nA: ab\nQ: x"]
    monkeypatch.setattr(restate_mod, "generate_texts", fake)

    class Pick:
        name = "pick"

        def select(self, ps):
            picked.append(list(ps))
            return ["arith", None, None, "strings"], None

    prompts = ["Q: what is 147 plus 8?\nA: ", "Q: hi\nA: ", "Q: x\nA: ",
               "Q: step by step: sort the letters of ab\nA: "]
    handle.set_mixture("classify")                     # an expert was active before
    r = Restated(Pick(), handle, tok)
    res = TwoPassEngine(handle, tok, max_new_tokens=3).run(prompts, r)
    assert seen[0]["prompts"] == ["Q: step by step: what is 147 plus 8?\nA: ",
                                  "Q: step by step: hi\nA: ", "Q: step by step: x\nA: ",
                                  "Q: step by step: sort the letters of ab\nA: "]
    assert seen[0]["merged"].data_ptr() == seen[0]["original"].data_ptr()   # base weights
    want = ["Q: 147+8=?\nA: ", "Q: hi\nA: ", "Q: x\nA: ", "Q: sort('ab')\nA: "]
    assert r.last_restated == ["147+8=?", None, None, "sort('ab')"]
    assert picked == [want] and res.answered == want and r.name == "restated pick"
    for p, s, out in zip(want, ["arith", None, None, "strings"], res.outputs):
        handle.set_mixture(s)
        assert generate(handle.model, tok, [p], max_new_tokens=3).texts[0] == out
    handle.set_mixture(None)
    assert TwoPassEngine(handle, tok, max_new_tokens=3).run(prompts, Pick()).answered is None


def test_restated_examples_keep_the_final_answer(monkeypatch, setup):
    """restated_examples: each example's question becomes its first step (the prompt built
    from it) and its answer the final answer; an example without a first step keeps its
    question. restated_task scores them as the parent training family where one exists."""
    from t2fast.adapt import restated_examples, restated_task
    from t2fast.adapt import restate as restate_mod
    from t2fast.tasks import get_task
    handle, tok = setup
    exs = get_task("arith_steps").examples("validation", 3)
    monkeypatch.setattr(restate_mod, "generate_texts",
                        lambda model, tok_, prompts, **kw: ["1+2=?\nA: 3", "nothing", "x\nA: 9"])
    got = restated_examples(handle, tok, exs)
    assert [e.question for e in got] == ["1+2=?", exs[1].question, "x"]
    assert got[0].prompt == "Q: 1+2=?\nA: " and got[1].prompt == exs[1].prompt
    assert [e.answer for e in got] == [e.answer.rsplit("\nA:", 1)[1].strip() for e in exs]
    assert all("\n" in e.answer for e in exs)                  # two-step answers before
    assert restated_task(get_task("arith_steps")).name == "arith"
    assert restated_task(get_task("choice_words")).name == "choice"
    assert restated_task(get_task("arith")).name == "arith"    # no parent: itself
