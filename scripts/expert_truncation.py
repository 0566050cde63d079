"""Truncated SVF experts: keep only the top-k directions of each matrix's change.

An SVF expert scales matrix W = U diag(σ) Vh to U diag(σ ⊙ z) Vh, i.e. adds
U diag(σ ⊙ (z − 1)) Vh to W. Keeping only the k entries of σ ⊙ (z − 1) largest in absolute value
(the others at z = 1) makes that change rank k: a serving mode could read W plus a rank-k
correction, ≈ 1 + 2k/r of W's bytes (r = min(m, n)) instead of U and Vh (about twice W's
bytes). :func:`truncate` builds such an expert; ``scripts/make_results.py`` measures how much of
each shipped expert's gain survives k = r/2, r/4, r/8 and r/16.
"""
from __future__ import annotations

import torch

from t2fast.decompose import SVDFactors
from t2fast.experts import Expert

#: The divisors d of the truncations measured (k = r / d per matrix).
DIVISORS = (2, 4, 8, 16)


def keep_count(rank: int, divisor: int) -> int:
    """k = rank // divisor, at least 1."""
    if divisor < 1:
        raise ValueError(f"divisor={divisor!r}: expected an integer >= 1")
    return max(1, rank // divisor)


def truncate(expert: Expert, factors: dict[str, SVDFactors], divisor: int,
             name: str | None = None) -> Expert:
    """``expert`` with, in every matrix, only the ``keep_count(r, divisor)`` entries of z whose
    σ ⊙ (z − 1) is largest in absolute value kept, the others set to 1 (float32 [r] each).

    ``factors`` are the base model's (their σ rank the directions); ``name`` defaults to
    ``{expert.name}_r{divisor}``. ``divisor=1`` returns the same z.
    """
    z = {}
    for target, v in expert.z.items():
        if target not in factors:
            raise KeyError(f"expert {expert.name!r}: no factors for target {target!r}")
        sigma = factors[target].S.float()
        if sigma.shape != v.shape:
            raise ValueError(f"expert {expert.name!r}, {target}: z has shape {tuple(v.shape)}, "
                             f"σ {tuple(sigma.shape)}")
        change = (sigma * (v.float() - 1)).abs()
        keep = change.topk(keep_count(v.numel(), divisor)).indices
        out = torch.ones_like(v, dtype=torch.float32)
        out[keep] = v.float()[keep]
        z[target] = out
    return Expert(name or f"{expert.name}_r{divisor}", z, expert.base_model, expert.fingerprint,
                  {**expert.extra, "truncated_divisor": divisor})


def correction_bytes_ratio(factors: dict[str, SVDFactors], divisor: int) -> float:
    """Bytes of W plus a rank-k correction (k·(m + n) more entries per matrix) over W's, summed
    over ``factors``' matrices."""
    dense = sum(f.shape[0] * f.shape[1] for f in factors.values())
    extra = sum(keep_count(f.rank, divisor) * (f.shape[0] + f.shape[1]) for f in factors.values())
    return (dense + extra) / dense
