"""Scaled matmul: ``out[M, N] = (A ⊙ scale[None, :]) @ B`` with fp32 accumulation, and its
launcher :func:`launch_scaled_matmul`.

It computes the merge ``W'[m, n] = U diag(σ ⊙ z) Vh`` of :func:`t2fast.ops.svf_merge`
(A = U, scale = σ ⊙ z in fp32, B = Vh; tiles from :func:`merge_tile`).
The scaled A tile is cast to B's dtype before the dot (tensor cores for bf16/fp16 weights),
unless DOT_FP32.

Shapes: A [M, K], scale [K] (HAS_SCALE), B [K, N]. Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N) in
grouped order, SPLIT_K). With SPLIT_K == 1, ``out`` is [M, N] in the output dtype; with
SPLIT_K > 1 each split writes its partial sum to its own fp32 slab ``out[split]`` of a
workspace [SPLIT_K, M, N] (no atomics: the result is deterministic), and
:func:`split_sum_kernel` adds the slabs and casts. :func:`launch_scaled_matmul` launches both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import plans
from .plans import SPLIT_SUM_BLOCK, TileConfig
from .launch import dot_fp32, interpreter_active, launch_options, needs_offset_64
from .tile_utils import reduce_tile, tile_offsets


@triton.jit(do_not_specialize=["M"])
def scaled_matmul_kernel(
    a_ptr, scale_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_os, stride_om, stride_on,
    HAS_SCALE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N,
                                                  GROUP_M, OFFSET_64)
    split = tl.program_id(1)
    if OFFSET_64:
        split = split.to(tl.int64)
    acc = reduce_tile(a_ptr, b_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, K, split,
                      stride_am, stride_ak, stride_bk, stride_bn,
                      HAS_SCALE, SPLIT_K, DOT_FP32, OFFSET_64, BLOCK_M, BLOCK_N, BLOCK_K)

    out_ptrs = (out_ptr + split * stride_os + offs_m[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def split_sum_kernel(
    ws_ptr, out_ptr, M, N,
    stride_ws, stride_wm, stride_wn,
    stride_om, stride_on,
    SPLIT_K: tl.constexpr, OFFSET_64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[M, N] = Σ_s ws[s]`` (fp32 workspace [SPLIT_K, M, N]) cast to out's dtype.

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)). The slabs are summed in a fixed order.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if OFFSET_64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(SPLIT_K):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_ws
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def merge_tile(A, B) -> TileConfig:
    """Tiles of a large GEMM such as the merge ``U diag(σ⊙z) Vh`` (M = m rows)."""
    if interpreter_active():
        return plans.INTERPRETER_PLAN.expand
    return plans.gemm_tile(A.shape[0], B.dtype)


def launch_scaled_matmul(A, B, scale=None, tile: TileConfig | None = None, out_dtype=None,
                         out=None):
    """``(A * scale[None, :]) @ B`` → [M, N] in ``out_dtype`` (default A's dtype).

    ``A`` [M, K], ``B`` [K, N] with any strides (pass ``U.t()`` for Uᵀ), ``scale`` [K] fp32 or
    None; ``out`` [M, N] (any strides) is written when given. ``tile.split_k > 1`` reduces into an
    fp32 workspace of ``split_k`` slabs and sums them in a second kernel. Inputs are not checked:
    call through :mod:`t2fast.ops`.
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
    wide = needs_offset_64(A, B, target, out)
    scaled_matmul_kernel[tile.grid(M, N)](
        A, scale if scale is not None else A, B, target, M, N, K,
        *A.stride(), *B.stride(), *slab_stride,
        HAS_SCALE=scale is not None, DOT_FP32=dot_fp32(B.dtype), OFFSET_64=wide, **tile.meta(),
        **launch_options(tile))
    if tile.split_k > 1:
        bm, bn = SPLIT_SUM_BLOCK
        split_sum_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            target, out, M, N, *target.stride(), *out.stride(),
            SPLIT_K=tile.split_k, OFFSET_64=wide, BLOCK_M=bm, BLOCK_N=bn)
    return out
