"""Losses: REINFORCE with a full-vocabulary KL penalty to the base model, and SFT.

Notation for a batch of B completions of length ≤ G: ``logits`` [B, G, V] of the trained policy
π_{W'} at each completion position, ``base_logits`` [B, G, V] of the base model π_W (computed
without gradient), ``tokens`` [B, G] the completion tokens ŷ, ``mask`` [B, G] (1 on real tokens,
including end-of-sequence), ``rewards`` [B].

REINFORCE (the paper's objective, maximised):
    J = 1/B Σ_i r_i · log π_{W'}(ŷ_i | x_i)  −  λ · 1/B Σ_i KL_i
with log π(ŷ_i|x_i) = Σ_t log π(ŷ_it | x_i, ŷ_i<t) (``reduction="sum"``; ``"mean"`` divides by
the answer length) and KL_i the mean over answer positions t of the full-vocabulary
KL(π_{W'}(·|x_i, ŷ_i<t) ‖ π_W(·|x_i, ŷ_i<t)). The returned loss is −J.

π is the distribution the completions were *sampled* from: softmax(logits / T) at the sampling
``temperature`` T (T = 1, the paper's setting, is the model's own distribution). Computing the
log-probabilities at the sampling temperature keeps the gradient on-policy; the KL compares the
adapted and the base model's sampling distributions at the same T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) at each position: [B, G]."""
    return torch.log_softmax(_acc(logits), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                      reduction: str = "sum") -> torch.Tensor:
    """log π(ŷ|x) per row [B]: sum (or mean) of the masked token log-probs."""
    lp = token_logprobs(logits, tokens) * mask
    total = lp.sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def full_vocab_kl(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor
                  ) -> torch.Tensor:
    """Per row [B]: mean over masked positions of KL(softmax(logits) ‖ softmax(base_logits)).

    Pass logits already divided by the sampling temperature for the KL between sampling
    distributions."""
    logp = torch.log_softmax(_acc(logits), -1)
    logq = torch.log_softmax(_acc(base_logits).to(logp.dtype), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)                       # [B, G]
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def advantages(rewards: torch.Tensor, group_size: int = 1, baseline: str = "none"
               ) -> torch.Tensor:
    """Rewards minus a baseline: ``"none"`` (the paper) or ``"mean"`` over each group of
    ``group_size`` consecutive rows (the samples of one prompt)."""
    if baseline == "none":
        return rewards
    if baseline == "mean":
        if rewards.shape[0] % group_size:
            raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of "
                             f"{group_size}")
        g = rewards.view(-1, group_size)
        return (g - g.mean(-1, keepdim=True)).reshape(-1)
    raise ValueError(f"baseline must be 'none' or 'mean', got {baseline!r}")


@dataclass
class LossParts:
    loss: torch.Tensor
    pg: torch.Tensor        # policy-gradient term (−1/B Σ A_i log π(ŷ_i))
    kl: torch.Tensor | None  # mean KL (not multiplied by λ); None when not computed
    logprob: torch.Tensor   # mean log π(ŷ|x)

    def stats(self) -> dict:
        return {"loss": float(self.loss.detach()), "pg_loss": float(self.pg),
                "kl": None if self.kl is None else float(self.kl),
                "logprob": float(self.logprob)}


def reinforce_kl_loss(logits: torch.Tensor, base_logits: torch.Tensor | None,
                      tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                      kl_coef: float = 0.0, reduction: str = "sum",
                      temperature: float = 1.0) -> LossParts:
    """−J (see the module docstring). ``rewards`` are used as given (pass advantages if a
    baseline is wanted). ``base_logits`` may be None when ``kl_coef`` is 0 (KL then not
    computed: None). ``temperature``: the one the completions were sampled at; both models'
    logits are divided by it (on-policy log-probabilities, KL between sampling distributions)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if temperature != 1.0:
        logits = _acc(logits) / temperature
        base_logits = None if base_logits is None else _acc(base_logits) / temperature
    rewards = rewards.to(logits.device, _acc(logits).dtype)
    seq_lp = sequence_logprobs(logits, tokens, mask, reduction)
    pg = -(rewards.detach() * seq_lp).mean()
    if base_logits is not None:
        kl = full_vocab_kl(logits, base_logits.detach(), mask).mean()
    else:
        if kl_coef:
            raise ValueError("kl_coef > 0 needs the base model's logits")
        return LossParts(pg, pg.detach(), None, seq_lp.detach().mean())
    loss = pg + kl_coef * kl
    return LossParts(loss, pg.detach(), kl.detach(), seq_lp.detach().mean())


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked answer tokens."""
    nll = F.cross_entropy(_acc(logits).reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                          reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1)
