"""Pure-torch reference versions of the SVF ops (``*_reference``): the CPU fallback for what the
activation-dtype torch backend does not cover, and the oracle of every kernel test.

All functions compute in float32 (float64 when an input is float64), are differentiable with
respect to every floating input, and return the dtype the contract names.
"""
from __future__ import annotations

import torch


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def svf_group_reference(x, Us, S, Vh, Z, idx):
    """``y[t] = cat_i U_i @ (S_i * Z_i[idx[t]] * (Vh_i @ x[t]))`` → [T, Σ m_i] in x's dtype;
    S [R], Vh [R, n], Z [slots, R] stacked over the slices U_i [m_i, r_i]."""
    acc = _acc_dtype(x, *Us, S, Vh, Z)
    h = (x.to(acc) @ Vh.to(acc).T) * S.to(acc) * Z.to(acc)[idx.long()]
    outs, at = [], 0
    for U in Us:
        outs.append(h[:, at:at + U.shape[1]] @ U.to(acc).T)
        at += U.shape[1]
    return torch.cat(outs, dim=-1).to(x.dtype)


def svf_matmul_reference(x, U, S, Vh, Z, idx):
    """y[t] = U @ (S * Z[idx[t]] * (Vh @ x[t])): x [T, n] → y [T, m] in x's dtype."""
    return svf_group_reference(x, [U], S, Vh, Z, idx)


def mix_experts_reference(alpha, bank):
    """Z = alpha @ bank: alpha [slots, K], bank [K, r] → [slots, r] (float32 or float64)."""
    acc = _acc_dtype(alpha, bank)
    return alpha.to(acc) @ bank.to(acc)


def svf_matmul_mix_reference(x, U, S, Vh, alpha, bank, idx):
    """:func:`svf_matmul_reference` with Z = alpha @ bank."""
    return svf_matmul_reference(x, U, S, Vh, mix_experts_reference(alpha, bank), idx)


def svf_merge_reference(U, S, z, Vh):
    """W' = U diag(S * z) Vh: [m, n] in U's dtype."""
    acc = _acc_dtype(U, S, z, Vh)
    return ((U.to(acc) * (S.to(acc) * z.to(acc))) @ Vh.to(acc)).to(U.dtype)
