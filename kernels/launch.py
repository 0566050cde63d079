"""Launch code of the SVF kernels: plans in, kernels launched, outputs allocated.

These functions assume validated inputs (shapes, devices and dtypes are checked once by the
dispatch layer in :mod:`t2fast.ops`). Tile configs come from :mod:`t2fast.kernels.configs`
(shipped tables, a heuristic, or small fixed blocks under Triton's interpreter); nothing here
autotunes or synchronizes with the host, so every call can be captured in a CUDA graph once its
kernels are compiled.

One SVF matmul at decode (split reductions) is: memset of an fp32 ``h`` → shrink (fp32 atomics)
→ expand into fp32 slabs → split sum (cast to x's dtype). At prefill it is two GEMMs: shrink
storing ``h`` in x's dtype with the σ⊙z scale in its epilogue, then the expand.
"""
from __future__ import annotations

import os

import torch
import triton

from . import configs
from .configs import SPLIT_SUM_BLOCK, SVFPlan, TileConfig
from .scaled_matmul import scaled_matmul_kernel, split_sum_kernel
from .svf_shrink import svf_shrink_kernel


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_fp32(*tensors) -> bool:
    """IEEE fp32 dots for fp32 operands and under the interpreter (its bf16 dot is inexact)."""
    return interpreter_active() or any(t.dtype == torch.float32 for t in tensors)


def _launch_options(tile: TileConfig) -> dict:
    if interpreter_active():
        return {}
    return dict(num_warps=tile.num_warps, num_stages=tile.num_stages)


def svf_plan(x: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> SVFPlan:
    """The plan for ``x`` [T, n] through U [m, r], Vh [r, n] (see :func:`configs.plan`)."""
    if interpreter_active():
        return configs.INTERPRETER_PLAN
    return configs.plan(x.shape[0], U.shape[0], Vh.shape[1], U.shape[1], U.dtype, x.device)


def svf_shrink(x, Vh, S, idx, Z=None, alpha=None, bank=None, tile: TileConfig | None = None,
               out=None, h_dtype: torch.dtype = torch.float32):
    """``h[t] = S * z_{idx[t]} * (Vh @ x[t])`` → [T, r].

    Either ``Z`` [slots, r] (a per-slot table) or ``alpha`` [slots, K] with ``bank`` [K, r]
    (mixed inside the kernel). ``tile`` defaults to the interpreter's blocks; ``h`` is written in
    ``h_dtype`` (fp32 whenever ``tile.split_k > 1``). ``out`` [T, r] is written when given and
    must be a zero-filled fp32 tensor when the reduction is split.
    """
    tile = tile or configs.INTERPRETER_PLAN.shrink
    T, N = x.shape
    R = Vh.shape[0]
    split = tile.split_k > 1
    if out is None:
        dtype = torch.float32 if split else h_dtype
        out = (torch.zeros if split else torch.empty)((T, R), device=x.device, dtype=dtype)
    elif split and out.dtype != torch.float32:
        raise ValueError(f"a split shrink accumulates with fp32 atomics; out is {out.dtype}")
    mix = Z is None
    if mix:
        K = bank.shape[0]
        z_arg, zs, a_s, b_s = alpha, (0, 0), alpha.stride(), bank.stride()
    else:
        K = 0
        z_arg, zs, a_s, b_s = Z, Z.stride(), (0, 0), (0, 0)
        alpha, bank = Z, Z    # unused pointers when MIX is off
    svf_shrink_kernel[tile.grid(T, R)](
        x, Vh, S, z_arg, alpha, bank, idx, out, T, N, R, K,
        *x.stride(), *Vh.stride(), *zs, *a_s, *b_s, *out.stride(),
        MIX=mix, DOT_FP32=_dot_fp32(x, Vh), **tile.meta(), **_launch_options(tile))
    return out


def scaled_matmul(A, B, scale=None, tile: TileConfig | None = None, out_dtype=None, out=None):
    """``(A * scale[None, :]) @ B`` → [M, N] in ``out_dtype`` (default A's dtype).

    ``A`` [M, K], ``B`` [K, N] with any strides (pass ``U.t()`` for Uᵀ), ``scale`` [K] fp32 or
    None; ``out`` [M, N] (any strides) is written when given. ``tile.split_k > 1`` reduces into an
    fp32 workspace of ``split_k`` slabs and sums them in a second kernel.
    """
    M, K = A.shape
    N = B.shape[1]
    tile = tile or merge_tile(A, B)
    if out is None:
        out = torch.empty((M, N), device=A.device, dtype=out_dtype or A.dtype)
    target = out
    if tile.split_k > 1:
        target = torch.empty((tile.split_k, M, N), device=A.device, dtype=torch.float32)
        slab_stride = target.stride()
    else:
        slab_stride = (0, *out.stride())
    scaled_matmul_kernel[tile.grid(M, N)](
        A, scale if scale is not None else A, B, target, M, N, K,
        *A.stride(), *B.stride(), *slab_stride,
        HAS_SCALE=scale is not None, DOT_FP32=_dot_fp32(A, B), **tile.meta(),
        **_launch_options(tile))
    if tile.split_k > 1:
        bm, bn = SPLIT_SUM_BLOCK
        split_sum_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            target, out, M, N, *target.stride(), *out.stride(),
            SPLIT_K=tile.split_k, BLOCK_M=bm, BLOCK_N=bn)
    return out


def merge_tile(A, B) -> TileConfig:
    """Tiles of a large GEMM such as the merge ``U diag(σ⊙z) Vh`` (M = m rows)."""
    if interpreter_active():
        return configs.INTERPRETER_PLAN.expand
    return configs.gemm_tile(A.shape[0], B.dtype)


def svf_matmul(x, U, S, Vh, idx, Z=None, alpha=None, bank=None, plan: SVFPlan | None = None):
    """``y[t] = U @ (S * z_{idx[t]} * (Vh @ x[t]))`` → [T, m] in x's dtype (shrink + expand).

    ``Z`` [slots, r] or ``alpha`` [slots, K] with ``bank`` [K, r] as in :func:`svf_shrink`;
    ``plan`` defaults to :func:`svf_plan`.
    """
    plan = plan or svf_plan(x, U, Vh)
    h = svf_shrink(x, Vh, S, idx, Z=Z, alpha=alpha, bank=bank, tile=plan.shrink,
                   h_dtype=plan.h_dtype(x.dtype))
    return scaled_matmul(h, U.t(), tile=plan.expand, out_dtype=x.dtype)
