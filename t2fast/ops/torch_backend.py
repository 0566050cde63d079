"""The ``"torch"`` backend: the SVF map as plain torch ops, in the activation dtype.

For bf16/fp16 inputs this is the composition a user would write,
``((x @ Vh.T) * (S * Z[idx]).to(x.dtype)) @ U.T``: two matmuls on the weights as stored (cuBLAS or
oneDNN accumulate in fp32) and one elementwise scale — no per-call copy of U or Vh. Other dtype
combinations (fp32, fp64, mixed) go through :mod:`t2fast.ops.reference`, which upcasts only what
is not already in the accumulation dtype. The float64 oracle of the tests stays the reference
module, called on float64 inputs.
"""
from __future__ import annotations

import torch

from . import reference

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_activation_dtype(x, U, Vh) -> bool:
    return x.dtype in HALF_DTYPES and U.dtype == x.dtype and Vh.dtype == x.dtype


def svf_matmul(x, U, S, Vh, Z, idx):
    """y[t] = U @ (S * Z[idx[t]] * (Vh @ x[t])): x [T, n] → y [T, m] in x's dtype."""
    if not _in_activation_dtype(x, U, Vh):
        return reference.svf_matmul(x, U, S, Vh, Z, idx)
    scale = (S.float() * Z.float()[idx.long()]).to(x.dtype)       # [T, r]
    return ((x @ Vh.T) * scale) @ U.T


def svf_matmul_mix(x, U, S, Vh, alpha, bank, idx):
    """svf_matmul with Z = alpha @ bank (mixed in fp32, [slots, r])."""
    return svf_matmul(x, U, S, Vh, reference.mix_experts(alpha, bank), idx)
