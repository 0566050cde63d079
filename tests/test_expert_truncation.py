"""Truncated SVF experts (scripts/expert_truncation.py): only the top-k directions of
σ ⊙ (z − 1) per matrix kept, the others at z = 1."""

import pytest
import torch

from t2fast.decompose import SVDFactors
from t2fast.experts import Expert

from script_loader import load_script


tr = load_script("expert_truncation")


def factors(rank=8, m=12, n=8):
    S = torch.linspace(8.0, 1.0, rank)
    return {"w": SVDFactors(torch.eye(m)[:, :rank], S, torch.eye(n)[:rank])}


def test_truncate_keeps_the_largest_changes_by_sigma():
    f = factors()
    # σ = 8, 7, ..., 1: |σ(z − 1)| is 4 (entry 0), 2.5 (entry 3), 0.8 (entry 7), 0.15 (entry 5),
    # while |z − 1| alone would rank entry 7 first
    z = torch.ones(8)
    z[0], z[3], z[7], z[5] = 1.5, 0.5, 1.8, 1.05
    change = (f["w"].S * (z - 1)).abs()
    assert sorted(change.topk(2).indices.tolist()) == [0, 3]
    e = Expert("x", {"w": z})
    t = tr.truncate(e, f, 4)                              # k = 8 // 4 = 2
    kept = (t.z["w"] != 1).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(change.topk(2).indices.tolist())
    assert torch.equal(t.z["w"][kept], z[kept])
    assert t.name == "x_r4" and t.extra["truncated_divisor"] == 4
    assert torch.equal(tr.truncate(e, f, 1).z["w"], z)    # d = 1: the same expert
    # the change to W has rank k
    delta = f["w"].reconstruct(t.z["w"]) - f["w"].reconstruct()
    assert torch.linalg.matrix_rank(delta) == 2


def test_keep_count_and_bytes():
    assert [tr.keep_count(256, d) for d in tr.DIVISORS] == [128, 64, 32, 16]
    assert tr.keep_count(8, 16) == 1
    with pytest.raises(ValueError, match="divisor"):
        tr.keep_count(8, 0)
    f = factors(rank=8, m=12, n=8)
    assert tr.correction_bytes_ratio(f, 2) == pytest.approx((96 + 4 * 20) / 96)


def test_truncate_checks_shapes():
    with pytest.raises(KeyError, match="no factors"):
        tr.truncate(Expert("x", {"v": torch.ones(8)}), factors(), 2)
    with pytest.raises(ValueError, match="shape"):
        tr.truncate(Expert("x", {"w": torch.ones(5)}), factors(), 2)
