"""Few-shot CEM: recovers a known optimum, options behave, the batched few-shot scorer gives every
row its own α."""
import pytest
import torch

import t2fast
from t2fast.adapt import CEMConfig, FewShotScorer, cem_search, fewshot_cem, transform
from t2fast.experts import Expert
from t2fast.models import build_char_tokenizer, random_tiny_llama
from t2fast.tasks import get_task
from t2fast.train.config import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


TARGET = torch.tensor([0.7, -0.2, 0.4])


def synthetic(target):
    """Accuracy-like score: 10 'examples' at increasing tolerances; tie-break = −distance."""
    calls = []

    def score(pop):
        calls.append(pop.shape[0])
        d = (pop - target).flatten(1).norm(dim=1)
        tolerances = torch.linspace(0.02, 1.0, 10)
        acc = (d[:, None] < tolerances[None]).float().mean(1)
        return acc, -d
    return score, calls


def test_cem_recovers_known_optimum():
    score, calls = synthetic(TARGET)
    res = cem_search(score, (3,), CEMConfig(population=32, iterations=30, init_std=0.5, seed=1))
    assert torch.allclose(res.alpha, TARGET, atol=0.05), res.alpha
    assert res.score >= 0.9
    assert len(res.history) == 30 and all(c == 32 for c in calls)
    assert res.evaluations == 30 * 32
    best = [h["best_score"] for h in res.history]
    assert best == sorted(best)                       # keep-best never gets worse


def test_cem_per_layer_shape_and_optimum():
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    score, _ = synthetic(target)
    res = cem_search(score, (3, 2), CEMConfig(population=48, iterations=40, init_std=0.5,
                                              per_layer=True, seed=0))
    assert res.alpha.shape == (3, 2)
    assert torch.allclose(res.alpha, target, atol=0.1), res.alpha


def test_tiebreak_decides_between_equal_accuracies():
    # accuracy is 1 everywhere; only the tie-break (−distance to TARGET) can guide the search
    def score(pop):
        return torch.ones(pop.shape[0]), -(pop - TARGET).norm(dim=1)
    res = cem_search(score, (3,), CEMConfig(population=32, iterations=30, seed=2))
    assert torch.allclose(res.alpha, TARGET, atol=0.05)


def test_clamp_and_normalize():
    x = torch.tensor([[3.0, -2.0, 1.0], [0.5, -0.5, 0.0]])
    c = transform(x, clamp=(-1.0, 2.0))
    assert c.tolist() == [[2.0, -1.0, 1.0], [0.5, -0.5, 0.0]]
    n = transform(x, clamp=(-1.0, 2.0), normalize=True)
    assert n[0].sum().item() == pytest.approx(1.0)
    assert n[1].abs().sum().item() == pytest.approx(1.0)   # sum ≈ 0 falls back to Σ|α|
    score, _ = synthetic(torch.tensor([0.2, 0.3, 0.5]))
    res = cem_search(score, (3,), CEMConfig(population=16, iterations=5, normalize=True,
                                            clamp=(0.0, 1.0)))
    assert res.alpha.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (res.alpha >= 0).all()


def test_keep_best_off_returns_final_mean_and_patience_stops():
    score, calls = synthetic(TARGET)
    res = cem_search(score, (3,), CEMConfig(population=8, iterations=3, keep_best=False))
    assert torch.allclose(res.alpha, transform(torch.tensor(res.history[-1]["mean"]),
                                               (-1.0, 2.0)))
    assert calls[-1] == 1                               # the final mean was scored
    const = cem_search(lambda p: (torch.zeros(p.shape[0]), None), (2,),
                       CEMConfig(population=4, iterations=50, patience=3))
    assert len(const.history) == 4


@pytest.mark.parametrize("kw,msg", [
    (dict(population=1), "at least 2"),
    (dict(elite_ratio=0.0), r"\(0, 1\]"),
    (dict(init_std=-1.0), "positive"),
    (dict(clamp=(1.0, 0.0)), "lo < hi"),
    (dict(iterations=0), ">= 1"),
    (dict(patience=0), ">= 1"),
    (dict(objective="loss"), "likelihood"),
    (dict(space="relative", keep_base=False), "residual"),
])
def test_bad_cem_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CEMConfig(**kw).validate()
    with pytest.raises(ConfigError, match="init_mean"):
        cem_search(lambda p: (torch.zeros(p.shape[0]), None), (3,),
                   CEMConfig(init_mean=[1.0, 2.0]))


@pytest.fixture(scope="module")
def patched():
    tok = build_char_tokenizer()
    model = random_tiny_llama(3, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2,
                              initializer_range=0.1)
    handle = t2fast.patch_model(model, backend="torch", progress=False, cache_dir=False)
    f = handle.decomposition.factors
    handle.add_experts([Expert.random(n, f, scale=0.5, seed=i)
                        for i, n in enumerate(["a", "b", "c"])])
    return handle, tok


def test_fewshot_scorer_batches_rows_with_their_own_alpha(patched, monkeypatch):
    handle, tok = patched
    task = get_task("arith")
    exs = task.examples("validation", 3)
    import t2fast.adapt.cem as cem_module
    batched = []                                        # the texts of the batched generation

    def recording(*a, **k):
        out = real_generate(*a, **k)
        batched.extend(out.texts)
        return out
    real_generate = cem_module.generate
    monkeypatch.setattr(cem_module, "generate", recording)
    # score the population in one batched call (rows carry their own α) ...
    scorer = FewShotScorer(handle, tok, task, exs, max_new_tokens=4)
    pop = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.5, -0.2, 0.0]])
    acc, ll = scorer(pop)
    assert acc.shape == (4,) and ll.shape == (4,) and scorer.calls == 1
    assert len(batched) == 4 * len(exs)
    # ... and compare with each member alone on merged weights: the same generations (the
    # random model rarely answers right, so its accuracies alone would not tell rows apart)
    from t2fast.train.rollout import completion_logits, generate, teacher_batch
    from t2fast.train.objectives import token_logprobs
    alone_texts = []
    for p in range(4):
        handle.set_mixture(pop[p])
        texts = generate(handle.model, tok, [e.prompt for e in exs], max_new_tokens=4).texts
        alone_texts.append(texts)
        assert batched[p * len(exs):(p + 1) * len(exs)] == texts, p
        a = sum(task.score(t, e).correct for t, e in zip(texts, exs)) / len(exs)
        b = teacher_batch(tok, [e.prompt for e in exs], [e.answer for e in exs])
        with torch.no_grad():
            lp = token_logprobs(completion_logits(handle.model, b), b.completion_ids)
        alone = ((lp * b.completion_mask).sum(-1) / b.completion_mask.sum(-1)).mean()
        assert acc[p].item() == pytest.approx(a)
        assert ll[p].item() == pytest.approx(alone.item(), abs=1e-4)
    # four different mixtures, four different log-likelihoods and generations
    assert len(set(ll.tolist())) == 4
    assert len({tuple(t) for t in alone_texts}) > 1
    handle.set_mixture(None)
    # split into several calls when max_rows is small: same numbers
    acc2, ll2 = FewShotScorer(handle, tok, task, exs, max_new_tokens=4, max_rows=5)(pop)
    assert torch.equal(acc, acc2) and torch.allclose(ll, ll2, atol=1e-5)


def test_fewshot_cem_end_to_end(patched):
    handle, tok = patched
    task = get_task("choice")
    res = fewshot_cem(handle, tok, task, task.examples("validation", 3),
                      CEMConfig(population=4, iterations=2), max_new_tokens=2)
    assert res.alpha.shape == (3,) and len(res.history) == 2
    res = fewshot_cem(handle, tok, task, task.examples("validation", 2),
                      CEMConfig(population=3, iterations=1, per_layer=True), max_new_tokens=2)
    assert res.alpha.shape == (handle.num_layers, 3)
    with pytest.raises(ValueError, match="at least one example"):
        FewShotScorer(handle, tok, task, [])


def test_members_are_scaled_into_the_mixture_bounds():
    """With many experts the default clamp (-1, 2) allows Σ|α| = 2K; every member scored and the
    result stay within the bounds the handle enforces (|α_k| ≤ 4, Σ|α_k| ≤ 8 by default)."""
    from t2fast.mixtures import DEFAULT_BOUNDS
    seen = []

    def score(pop):
        seen.append(pop.clone())
        return pop.sum(-1), None                    # pushes every weight up to the clamp

    res = cem_search(score, (6,), CEMConfig(population=8, iterations=4, init_mean=2.0),
                     bounds=DEFAULT_BOUNDS)
    pops = torch.cat(seen + [res.alpha[None]])
    assert pops.abs().max() <= DEFAULT_BOUNDS.max_abs
    assert pops.abs().sum(-1).max() <= DEFAULT_BOUNDS.max_l1 + 1e-5
    assert pops.abs().sum(-1).max() > DEFAULT_BOUNDS.max_l1 - 1e-3    # scaled, not zeroed
    unbounded = cem_search(score, (6,), CEMConfig(population=8, iterations=4, init_mean=2.0))
    assert unbounded.alpha.abs().sum() > DEFAULT_BOUNDS.max_l1        # the case being guarded


def test_mixture_spec_and_residual_bounds():
    from t2fast.adapt.cem import mixture_spec, residual_bounds
    from t2fast.mixtures import DEFAULT_BOUNDS, parse_mixture
    a = torch.tensor([0.5, -0.25, 0.0])
    spec = mixture_spec(a, ["x", "y", "w"])
    assert spec == {"base": 0.75, "x": 0.5, "y": -0.25, "w": 0.0}
    assert mixture_spec(a, ["x", "y", "w"], "absolute") is a
    per_layer = mixture_spec(torch.tensor([[1.0, 0.0], [0.25, 0.25]]), ["x", "y"])
    assert per_layer == {"base": [0.0, 0.5], "x": [1.0, 0.25], "y": [0.0, 0.25]}
    # a residual α at its bounds is a mixture the handle accepts (base weight included)
    b = residual_bounds(DEFAULT_BOUNDS)
    worst = transform(torch.tensor([[-9.0, -9.0, -9.0], [9.0, 9.0, 9.0]]), None, False, b)
    for row in worst:
        parse_mixture(mixture_spec(row, ["x", "y", "w"]), ["x", "y", "w"])
    with pytest.raises(ValueError, match="no room"):
        from t2fast.mixtures import MixtureBounds
        residual_bounds(MixtureBounds(max_abs=1.0, max_l1=8.0))


@pytest.mark.parametrize("space", ["absolute", "residual"])
@pytest.mark.parametrize("K", [2, 3, 6, 16])
def test_every_transformed_member_is_a_mixture_the_handle_accepts(space, K):
    """Members scaled onto the L1 bound in float32 used to land a hair outside it (and a
    residual member's base weight 1 − Σα outside max_abs), which the handle's exact check
    refused mid-search."""
    from t2fast.adapt.cem import mixture_spec, residual_bounds
    from t2fast.mixtures import DEFAULT_BOUNDS, parse_mixture
    names = [f"e{k}" for k in range(K)]
    bounds = DEFAULT_BOUNDS if space == "absolute" else residual_bounds(DEFAULT_BOUNDS)
    g = torch.Generator().manual_seed(K)
    raw = torch.cat([torch.randn(500, K, generator=g) * 4,
                     -torch.rand(500, K, generator=g) * 4])       # all negative: base weight up
    members = transform(raw, (-8.0, 8.0), False, bounds)
    assert members.dtype == raw.dtype
    assert (members.abs().sum(-1) > bounds.max_l1 * 0.999).sum() > 20    # many on the bound
    for row in members:
        parse_mixture(mixture_spec(row, names, space), names)


def test_residual_alpha_zero_is_the_base_model(patched):
    """Residual α = 0 scores exactly as the base model; absolute α = uniform 1/K is the
    residual uniform mixture."""
    handle, tok = patched
    task = get_task("arith")
    exs = task.examples("validation", 3)
    res = FewShotScorer(handle, tok, task, exs, max_new_tokens=4, space="residual")
    ab = FewShotScorer(handle, tok, task, exs, max_new_tokens=4, space="absolute")
    zero, uni = torch.zeros(1, 3), torch.full((1, 3), 1 / 3)
    handle.set_mixture(None)
    from t2fast.train.objectives import token_logprobs
    from t2fast.train.rollout import completion_logits, teacher_batch
    b = teacher_batch(tok, [e.prompt for e in exs], [e.answer for e in exs])
    with torch.no_grad():
        lp = token_logprobs(completion_logits(handle.model, b), b.completion_ids)
    base_ll = ((lp * b.completion_mask).sum(-1) / b.completion_mask.sum(-1)).mean()
    assert res.likelihood(zero).item() == pytest.approx(base_ll.item(), abs=1e-4)
    assert res.likelihood(uni).item() == pytest.approx(ab.likelihood(uni).item(), abs=1e-4)
    with pytest.raises(ValueError, match="space"):
        FewShotScorer(handle, tok, task, exs, space="relative")


def test_fewshot_cem_keeps_the_base_model_unless_the_shots_show_a_gain(patched, monkeypatch):
    handle, tok = patched
    task = get_task("choice")
    exs = task.examples("validation", 3)
    cfg = CEMConfig(population=4, iterations=2)
    assert cfg.objective == "likelihood" and cfg.space == "residual" and cfg.keep_base
    # a scorer that finds every member worse than the base on the shots: base kept
    monkeypatch.setattr(FewShotScorer, "measure", lambda self, a: (
        torch.tensor([1.0] + [0.0] * (len(a) - 1)), torch.tensor([0.0] + [-1.0] * (len(a) - 1))))
    res = fewshot_cem(handle, tok, task, exs, cfg, max_new_tokens=2)
    assert res.kept_base and res.spec is None and not res.alpha.any()
    assert res.fewshot_accuracy == 1.0 and res.base == {"accuracy": 1.0, "likelihood": 0.0}
    # better likelihood but lower accuracy on the shots: still the base model
    monkeypatch.setattr(FewShotScorer, "measure", lambda self, a: (
        torch.tensor([1.0, 0.5]), torch.tensor([-1.0, 0.0])))
    assert fewshot_cem(handle, tok, task, exs, cfg, max_new_tokens=2).kept_base
    # better on both: the search's best, served as a residual mixture
    monkeypatch.setattr(FewShotScorer, "measure", lambda self, a: (
        torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 0.0])))
    res = fewshot_cem(handle, tok, task, exs, cfg, max_new_tokens=2)
    assert not res.kept_base and set(res.spec) == {"base", *handle.expert_names}
    assert res.spec["base"] == pytest.approx(1 - res.alpha.sum().item())
    handle.set_mixture(res.spec)                          # a mixture the handle accepts
    handle.set_mixture(None)
    # the absolute space of the paper: the base model is not in it
    res = fewshot_cem(handle, tok, task, exs, CEMConfig(population=4, iterations=1,
                                                        space="absolute", keep_base=False),
                      max_new_tokens=2)
    assert res.base is None and torch.equal(res.spec, res.alpha)
    with pytest.raises(ConfigError, match="keep_base"):
        CEMConfig(space="absolute").validate()


def test_check_shots_are_held_out_of_the_search_and_decide_alone(patched, monkeypatch):
    """With check_shots = c (default: half the shots) the search scores only the first shots and
    the keep-base decision (and the reported few-shot numbers) the last c only."""
    handle, tok = patched
    task = get_task("choice")
    exs = task.examples("validation", 5)
    searched, measured = [], []
    search_call = FewShotScorer.__call__
    monkeypatch.setattr(FewShotScorer, "__call__", lambda self, a: (
        searched.append([e.question for e in self.examples]), search_call(self, a))[1])
    # the held-out shots find the search's best worse than the base: base kept
    monkeypatch.setattr(FewShotScorer, "measure", lambda self, a: (
        measured.append([e.question for e in self.examples]),
        (torch.tensor([0.5, 0.0]), torch.tensor([-1.0, -2.0])))[1])
    questions = [e.question for e in exs]
    # the default holds out half of the shots (5 // 2); an explicit count overrides it
    for check_shots, held in ((None, 2), (1, 1)):
        searched.clear(), measured.clear()
        cfg = CEMConfig(population=4, iterations=2, check_shots=check_shots)
        assert cfg.held_out(len(exs)) == held
        res = fewshot_cem(handle, tok, task, exs, cfg, max_new_tokens=2)
        assert res.kept_base and res.base == {"accuracy": 0.5, "likelihood": -1.0}
        assert res.check_shots == res.to_dict()["check_shots"] == held
        assert searched and all(q == questions[:5 - held] for q in searched)
        assert measured == [questions[5 - held:]]
    # 0: the searched shots decide; without keep_base nothing is held out by default
    searched.clear(), measured.clear()
    res = fewshot_cem(handle, tok, task, exs, CEMConfig(population=4, iterations=2,
                                                        check_shots=0), max_new_tokens=2)
    assert res.check_shots == 0 and all(q == questions for q in [*searched, *measured])
    assert CEMConfig(space="absolute", keep_base=False).held_out(20) == 0
    assert CEMConfig().held_out(1) == 0 and CEMConfig().held_out(20) == 10
    with pytest.raises(ValueError, match="check_shots=5 holds out every one of the 5"):
        fewshot_cem(handle, tok, task, exs, CEMConfig(check_shots=5), max_new_tokens=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="check_shots"):
            CEMConfig(check_shots=bad).validate()
    with pytest.raises(ConfigError, match="keep_base=True"):
        CEMConfig(check_shots=2, space="absolute", keep_base=False).validate()


def test_likelihood_objective_ranks_without_generating(patched, monkeypatch):
    handle, tok = patched
    task = get_task("arith")
    scorer = FewShotScorer(handle, tok, task, task.examples("validation", 2), max_new_tokens=4,
                           objective="likelihood", space="residual")
    monkeypatch.setattr(FewShotScorer, "accuracy", lambda *a: pytest.fail("generated"))
    ll, tie = scorer(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert tie is None and ll.shape == (2,) and ll[0] != ll[1]


def test_alpha_is_float32_under_a_bf16_default_dtype():
    score, _ = synthetic(TARGET)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for keep_base in (False, True):
            res = cem_search(lambda a: score(a.float()), (3,),
                             CEMConfig(population=8, iterations=3, seed=0, keep_base=keep_base))
            assert res.alpha.dtype == torch.float32, keep_base
    finally:
        torch.set_default_dtype(old)


def test_a_scorer_of_another_space_is_named_rather_than_searched_in(patched):
    """FewShotScorer reads α as absolute weights by default, CEMConfig searches the residual
    space: together they failed with an all-zero mixture (or searched the wrong space)."""
    handle, tok = patched
    task = get_task("arith")
    scorer = FewShotScorer(handle, tok, task, task.examples("validation", 2), max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"CEMConfig.space='residual', but the scorer reads "
                                          r"α in the 'absolute' space"):
        cem_search(scorer, (3,), CEMConfig(iterations=1, population=3))
