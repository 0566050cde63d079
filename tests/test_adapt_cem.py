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
    best = [h["best_accuracy"] for h in res.history]
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


def test_fewshot_scorer_batches_rows_with_their_own_alpha(patched):
    handle, tok = patched
    task = get_task("arith")
    exs = task.examples("validation", 3)
    # score the population in one batched call (rows carry their own α) ...
    scorer = FewShotScorer(handle, tok, task, exs, max_new_tokens=4)
    pop = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.5, -0.2, 0.0]])
    acc, ll = scorer(pop)
    assert acc.shape == (4,) and ll.shape == (4,) and scorer.calls == 1
    # ... and compare with each member alone on merged weights
    from t2fast.train.rollout import completion_logits, generate, teacher_batch
    from t2fast.train.objectives import token_logprobs
    for p in range(4):
        handle.set_mixture(pop[p])
        texts = generate(handle.model, tok, [e.prompt for e in exs], max_new_tokens=4).texts
        a = sum(task.score(t, e).correct for t, e in zip(texts, exs)) / len(exs)
        b = teacher_batch(tok, [e.prompt for e in exs], [e.answer for e in exs])
        with torch.no_grad():
            lp = token_logprobs(completion_logits(handle.model, b), b.completion_ids)
        alone = ((lp * b.completion_mask).sum(-1) / b.completion_mask.sum(-1)).mean()
        assert acc[p].item() == pytest.approx(a)
        assert ll[p].item() == pytest.approx(alone.item(), abs=1e-4)
    # four different mixtures, four different log-likelihoods
    assert len(set(ll.tolist())) == 4
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
