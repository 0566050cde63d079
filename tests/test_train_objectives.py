"""REINFORCE and KL: values and gradients against hand computations on tiny cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from t2fast.train.objectives import (advantages, full_vocab_kl, reinforce_kl_loss,
                                     sequence_logprobs, sft_loss, token_logprobs)


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(seed=0, B=2, G=3, V=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, G, V, generator=g, dtype=torch.float64)
    base = torch.randn(B, G, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, G), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)[:B, :G]
    return logits, base, tokens, mask


def test_policy_gradient_single_token_by_hand():
    # one sequence, one token, vocabulary of 3: loss = -r * log softmax(l)[y]
    l = torch.tensor([[[1.0, 2.0, 0.5]]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1]])
    m = torch.ones(1, 1, dtype=torch.float64)
    r = torch.tensor([1.0])
    parts = reinforce_kl_loss(l, None, y, m, r)
    p = [math.exp(v) for v in (1.0, 2.0, 0.5)]
    z = sum(p)
    p = [v / z for v in p]
    assert parts.loss.item() == pytest.approx(-math.log(p[1]), rel=1e-12)
    parts.loss.backward()
    # d(-r log p_y)/dl_j = -r (1[j=y] - p_j)
    expect = [p[0], p[1] - 1.0, p[2]]
    assert l.grad[0, 0].tolist() == pytest.approx(expect, rel=1e-10)


@pytest.mark.parametrize("reward", [1.0, -1.0, -0.1])
def test_policy_gradient_sign(reward):
    """A descent step raises log π of the sampled answer when r > 0, lowers it when r < 0."""
    logits, _, tokens, mask = _case()
    logits.requires_grad_(True)
    r = torch.full((2,), reward, dtype=torch.float64)
    reinforce_kl_loss(logits, None, tokens, mask, r).loss.backward()
    before = sequence_logprobs(logits.detach(), tokens, mask)
    after = sequence_logprobs(logits.detach() - 0.01 * logits.grad, tokens, mask)
    assert ((after - before) * reward > 0).all()


def test_policy_gradient_batch_by_hand():
    logits, _, tokens, mask = _case()
    logits.requires_grad_(True)
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for reduction in ("sum", "mean"):
        logits.grad = None
        reinforce_kl_loss(logits, None, tokens, mask, r, reduction=reduction).loss.backward()
        p = torch.softmax(logits.detach(), -1)
        onehot = F.one_hot(tokens, 5).double()
        scale = torch.ones(2, dtype=torch.float64) if reduction == "sum" else 1 / mask.sum(-1)
        # loss = -1/B Σ_i r_i s_i Σ_t m_it log p(y_it)
        expect = -(r * scale)[:, None, None] * mask[..., None] * (onehot - p) / 2
        assert torch.allclose(logits.grad, expect, atol=1e-12)


def test_kl_value_and_gradient_by_hand():
    logits, base, tokens, mask = _case(1)
    logits.requires_grad_(True)
    kl = full_vocab_kl(logits, base, mask)
    p = torch.softmax(logits.detach(), -1)
    q = torch.softmax(base, -1)
    per_pos = (p * (p.log() - q.log())).sum(-1)
    expect = (per_pos * mask).sum(-1) / mask.sum(-1)
    assert torch.allclose(kl, expect, atol=1e-12)
    ref = F.kl_div(q.log(), p.log(), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(per_pos, ref, atol=1e-12)
    # d KL(p||q) / d logits_j = p_j (log p_j - log q_j - KL)  (per position, times its weight)
    kl.sum().backward()
    grad = p * (p.log() - q.log() - per_pos[..., None])
    expect_grad = grad * (mask / mask.sum(-1, keepdim=True))[..., None]
    assert torch.allclose(logits.grad, expect_grad, atol=1e-12)


def test_kl_zero_for_identical_and_positive_otherwise():
    logits, base, tokens, mask = _case(2)
    assert torch.allclose(full_vocab_kl(logits, logits, mask), torch.zeros(2, dtype=torch.float64))
    assert (full_vocab_kl(logits, base, mask) > 0).all()


def test_kl_term_enters_with_coefficient():
    logits, base, tokens, mask = _case(3)
    r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    a = reinforce_kl_loss(logits, base, tokens, mask, r, kl_coef=0.0)
    b = reinforce_kl_loss(logits, base, tokens, mask, r, kl_coef=0.5)
    assert b.loss.item() == pytest.approx(a.loss.item() + 0.5 * a.kl.item(), rel=1e-10)
    assert a.kl.item() > 0
    # the KL gradient points back to the base distribution: a step lowers the KL
    logits = logits.clone().requires_grad_(True)
    reinforce_kl_loss(logits, base, tokens, mask, torch.zeros(2, dtype=torch.float64),
                      kl_coef=1.0).loss.backward()
    kl0 = full_vocab_kl(logits.detach(), base, mask).mean()
    kl1 = full_vocab_kl(logits.detach() - 0.1 * logits.grad, base, mask).mean()
    assert kl1 < kl0


def test_kl_needs_base_logits():
    logits, _, tokens, mask = _case()
    with pytest.raises(ValueError, match="base model"):
        reinforce_kl_loss(logits, None, tokens, mask, torch.ones(2), kl_coef=0.1)


def test_masked_tokens_do_not_matter():
    logits, base, tokens, mask = _case(4)
    a = reinforce_kl_loss(logits, base, tokens, mask, torch.ones(2), kl_coef=0.3)
    logits2, base2 = logits.clone(), base.clone()
    logits2[1, 2] = 100.0
    base2[1, 2] = -100.0
    tokens2 = tokens.clone()
    tokens2[1, 2] = 0
    b = reinforce_kl_loss(logits2, base2, tokens2, mask, torch.ones(2), kl_coef=0.3)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)


def test_advantages():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0])
    assert torch.equal(advantages(r, 2, "none"), r)
    assert advantages(r, 2, "mean").tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        advantages(r, 3, "mean")
    with pytest.raises(ValueError):
        advantages(r, 2, "median")


def test_sft_loss_is_masked_cross_entropy():
    logits, _, tokens, mask = _case(5)
    got = sft_loss(logits, tokens, mask)
    lp = token_logprobs(logits, tokens)
    assert got.item() == pytest.approx((-(lp * mask).sum() / mask.sum()).item(), rel=1e-10)


def test_temperature_gives_on_policy_logprobs_and_kl():
    """At sampling temperature T the loss uses log softmax(logits / T) for both the policy
    gradient and the KL: the same numbers as passing logits / T at T = 1, not those at T = 1."""
    logits, base, tokens, mask = _case(seed=3)
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)
    T = 0.7
    at_t = reinforce_kl_loss(logits, base, tokens, mask, r, kl_coef=0.2, temperature=T)
    scaled = reinforce_kl_loss(logits / T, base / T, tokens, mask, r, kl_coef=0.2)
    plain = reinforce_kl_loss(logits, base, tokens, mask, r, kl_coef=0.2)
    assert at_t.loss.item() == pytest.approx(scaled.loss.item(), rel=1e-12)
    assert at_t.kl.item() == pytest.approx(full_vocab_kl(logits / T, base / T, mask).mean()
                                           .item(), rel=1e-12)
    assert abs(at_t.loss.item() - plain.loss.item()) > 1e-3
    # the policy-gradient term is -mean(r * log π_T(ŷ)) with π_T the sampling distribution
    lp = torch.log_softmax(logits / T, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert at_t.pg.item() == pytest.approx(-(r * (lp * mask).sum(-1)).mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        reinforce_kl_loss(logits, base, tokens, mask, r, temperature=0.0)
