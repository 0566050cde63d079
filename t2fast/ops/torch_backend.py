"""The ``"torch"`` backend, :func:`svf_group_torch`: the SVF map as plain torch ops, in the
activation dtype.

For bf16/fp16 inputs this is the composition a user would write,
``((x @ Vh.T) * (S * Z[idx]).to(x.dtype)) @ U.T``: two matmuls on the weights as stored (cuBLAS or
oneDNN accumulate in fp32) and one elementwise scale — no per-call copy of U or Vh. A group of
matrices shares the first matmul (stacked Vh) and runs one second matmul per slice. Like that
composition, in fp16 it rounds ``x @ Vh.T`` to fp16 before the scale, so an input with
``‖x‖`` near fp16's maximum (65504) can overflow there where the dense product and the Triton
kernels (which scale the fp32 accumulator) stay finite; bf16 has fp32's range. Other dtype
combinations (fp32, fp64, mixed) go through :func:`t2fast.ops.reference.svf_group_reference`,
which upcasts only what is not already in the accumulation dtype. The float64 oracle of the tests
stays the reference module, called on float64 inputs.
"""
from __future__ import annotations

import torch

from ..kernels.plans import HALF_DTYPES
from .reference import svf_group_reference


def _in_activation_dtype(x, Us, Vh) -> bool:
    return (x.dtype in HALF_DTYPES and Vh.dtype == x.dtype
            and all(U.dtype == x.dtype for U in Us))


def svf_group_torch(x, Us, S, Vh, Z, idx):
    """``y[t] = cat_i U_i @ (S_i * Z_i[idx[t]] * (Vh_i @ x[t]))`` → [T, Σ m_i] in x's dtype;
    S [R], Vh [R, n], Z [slots, R] stacked over the slices."""
    if not _in_activation_dtype(x, Us, Vh):
        return svf_group_reference(x, Us, S, Vh, Z, idx)
    scale = (S.float() * Z.float()[idx.long()]).to(x.dtype)       # [T, R]
    h = (x @ Vh.T) * scale
    outs, at = [], 0
    for U in Us:
        outs.append(h[:, at:at + U.shape[1]] @ U.T)
        at += U.shape[1]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

