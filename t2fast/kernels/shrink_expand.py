"""The shrink and expand kernels of the SVF map ``y[t] = U (S ⊙ z_{slot(t)} ⊙ (Vh x[t]))`` for a
*group* of matrices that read the same input, and their launchers: ``launch_shrink``,
``launch_expand`` and ``launch_group`` (the two for one group).

A group is up to :data:`MAX_SLICES` matrices ``W_i ≈ U_i diag(S_i) Vh_i`` (q/k/v, gate/up; a
single matrix is a group of one) with one input x [T, n]. Its rank dimensions are stacked:
``Vh = cat(Vh_i)`` [R, n], ``S = cat(S_i)`` [R], the z table / expert bank ``[·, R]``, R = Σ r_i,
so one shrink computes ``h = S ⊙ z ⊙ (x Vhᵀ)`` [T, R] for every slice, and one grouped expand
writes ``y[:, cols_i] = h[:, ranks_i] U_iᵀ`` into the fused output [T, Σ m_i] (slice i's columns
follow slice i-1's; GQA's k/v have their own r_i and m_i). Two launches per group, whatever the
number of slices. Plans (tiles, h's dtype) come from :mod:`.plans`. The custom ops of
:mod:`t2fast.ops.custom_ops` (``torch.ops.t2fast.svf_matmul_triton`` and the rest) call
:func:`launch_group`; :mod:`t2fast.ops` is their only caller and validates the inputs.

The shrink kernel:

Shapes (strides are passed explicitly, so inputs need not be contiguous):
    x     [T, n]          fp16 / bf16 / fp32
    Vh    [R, n]          right singular vectors as rows (stacked over the group's slices)
    S     [R]             singular values (fp32)
    Z     [slots, R]      per-slot z table                      (MIX = False)
    alpha [slots, K]      per-slot mixing weights               (MIX = True)
    bank  [K, R]          expert bank, mixed on the fly         (MIX = True)
    idx   [T]             int32/int64 slot of each token
    h     [T, R]          fp32 (zero-filled by the launcher when SPLIT_K > 1), or x's dtype

Grid: (cdiv(T, BLOCK_M) · cdiv(R, BLOCK_N) in grouped order, SPLIT_K). The scale S ⊙ z is applied
in fp32 in the epilogue, before any rounding. The default plans never split (SPLIT_K = 1): a
row's h is one ascending chain of k-blocks whatever the batch. Only the order-dependent plans
(``deterministic=False``) split the n-reduction across programs that add their scaled partial
sums into ``h`` with relaxed fp32 atomics, whose order is not fixed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import plans
from .plans import SVFPlan, TileConfig
from .launch import (INT32_MAX, MAX_SLICES, dot_fp32, interpreter_active, launch_options,
                     needs_offset_64, pack_factors)
from .tile_utils import reduce_tile, tile_offsets

@triton.jit(do_not_specialize=["T"])
def svf_shrink_kernel(
    x_ptr, vh_ptr, s_ptr, z_ptr, alpha_ptr, bank_ptr, idx_ptr, h_ptr,
    T, N, R, K,
    stride_xt, stride_xn,
    stride_vr, stride_vn,
    stride_zs, stride_zr,
    stride_as, stride_ak,
    stride_bk, stride_br,
    stride_ht, stride_hr,
    MIX: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_t, offs_r, mask_t, mask_r = tile_offsets(tl.program_id(0), T, R, BLOCK_M, BLOCK_N,
                                                  GROUP_M, OFFSET_64)
    # x [T, n] @ Vhᵀ [n, r]: Vhᵀ[k, j] = Vh[j, k]
    acc = reduce_tile(x_ptr, vh_ptr, x_ptr, offs_t, offs_r, mask_t, mask_r, N, tl.program_id(1),
                      stride_xt, stride_xn, stride_vn, stride_vr,
                      False, SPLIT_K, DOT_FP32, OFFSET_64, BLOCK_M, BLOCK_N, BLOCK_K)

    # Epilogue: scale by sigma and by each token's z (gathered or mixed), in fp32.
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=0)
    if OFFSET_64:
        slot = slot.to(tl.int64)
    sigma = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mask_tr = mask_t[:, None] & mask_r[None, :]
    if MIX:
        z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K):
            a_k = tl.load(alpha_ptr + slot * stride_as + k * stride_ak,
                          mask=mask_t, other=0.0).to(tl.float32)
            e_k = tl.load(bank_ptr + k * stride_bk + offs_r * stride_br,
                          mask=mask_r, other=0.0).to(tl.float32)
            z += a_k[:, None] * e_k[None, :]
    else:
        z = tl.load(z_ptr + slot[:, None] * stride_zs + offs_r[None, :] * stride_zr,
                    mask=mask_tr, other=0.0).to(tl.float32)
    h = acc * (z * sigma[None, :])

    h_ptrs = h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr
    if SPLIT_K == 1:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_tr)
    else:
        tl.atomic_add(h_ptrs, h, mask=mask_tr, sem="relaxed")


@triton.jit
def _pick(s, v0, v1, v2):
    """``v_s`` for slice ``s`` (scalars)."""
    return tl.where(s == 0, v0, tl.where(s == 1, v1, v2))


@triton.jit(do_not_specialize=["T"])
def svf_expand_kernel(
    h_ptr, u_ptr, out_ptr,
    T, U0, U1, U2, M0, M1, M2, R0, R1, R2,
    stride_u0, stride_u1, stride_u2,
    stride_ht, stride_hr, stride_ot, stride_om,
    DOT_FP32: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The grouped expand ``y[:, cols_s] = h[:, ranks_s] @ U_sᵀ`` for slice s = program_id(1).

    Shapes:
        h    [T, R0 + R1 + R2]   fp32 or x's dtype (cast to U's dtype before the dot)
        U_s  [M_s, R_s]          at element offset U_s of ``u_ptr``, row stride ``stride_u_s``,
                                 unit column stride (all slices in one buffer)
        out  [T, M0 + M1 + M2]   x's dtype
    Grid: (cdiv(T, BLOCK_M) · max_s cdiv(M_s, BLOCK_N), slices); a program past its slice's
    tiles exits. The slices' sizes, offsets and strides are specialized like any integer
    argument (divisible by 16 or not), so packed layer factors compile to aligned, vectorized,
    ``cp.async``-pipelined loads, and the slice is picked with selects that keep that knowledge.
    """
    s = tl.program_id(1)
    M = _pick(s, M0, M1, M2)
    R = _pick(s, R0, R1, R2)
    u_off = _pick(s, U0, U1, U2)
    stride_um = _pick(s, stride_u0, stride_u1, stride_u2)
    h_col = _pick(s, 0, R0, R0 + R1)
    o_col = _pick(s, 0, M0, M0 + M1)
    if OFFSET_64:
        u_off = u_off.to(tl.int64)
        stride_um = stride_um.to(tl.int64)
        h_col = h_col.to(tl.int64)
        o_col = o_col.to(tl.int64)
    pid = tl.program_id(0)
    if pid >= tl.cdiv(T, BLOCK_M) * tl.cdiv(M, BLOCK_N):
        return
    offs_t, offs_m, mask_t, mask_m = tile_offsets(pid, T, M, BLOCK_M, BLOCK_N, GROUP_M,
                                                  OFFSET_64)
    # h_s [T, R_s] @ U_sᵀ [R_s, M_s]: U_sᵀ[k, j] = U_s[j, k]
    acc = reduce_tile(h_ptr + h_col * stride_hr, u_ptr + u_off, h_ptr, offs_t, offs_m, mask_t,
                      mask_m, R, 0, stride_ht, stride_hr, 1, stride_um,
                      False, 1, DOT_FP32, OFFSET_64, BLOCK_M, BLOCK_N, BLOCK_K)
    out_ptrs = (out_ptr + o_col * stride_om + offs_t[:, None] * stride_ot
                + offs_m[None, :] * stride_om)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_m[None, :])


# ------------------------------------------------------------------------------------ launch

def group_plan(x: torch.Tensor, Us, Vh: torch.Tensor, deterministic: bool = True) -> SVFPlan:
    """The plan for ``x`` [T, n] through the group ``Us`` ([m_i, r_i]), ``Vh`` [R, n]: the plan
    of the group's total shape (Σ m_i, n, R) (see :func:`plans.plan`)."""
    if interpreter_active():
        return plans.INTERPRETER_PLAN
    return plans.plan(x.shape[0], sum(U.shape[0] for U in Us), Vh.shape[1], Vh.shape[0],
                        Vh.dtype, x.device, deterministic)


def launch_shrink(x, Vh, S, idx, Z=None, alpha=None, bank=None, tile: TileConfig | None = None,
                  out=None, h_dtype: torch.dtype = torch.float32):
    """``h[t] = S * z_{idx[t]} * (Vh @ x[t])`` → [T, R].

    Either ``Z`` [slots, R] (a per-slot table) or ``alpha`` [slots, K] with ``bank`` [K, R]
    (mixed inside the kernel). ``tile`` defaults to the interpreter's blocks; ``h`` is written in
    ``h_dtype`` (fp32 whenever ``tile.split_k > 1``). ``out`` [T, R] is written when given and
    must be a zero-filled fp32 tensor when the reduction is split.
    """
    tile = tile or plans.INTERPRETER_PLAN.shrink
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
        MIX=mix, DOT_FP32=dot_fp32(Vh.dtype), OFFSET_64=needs_offset_64(x, Vh, out),
        **tile.meta(), **launch_options(tile))
    return out


def _slices(Us) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """(the Us as read, base tensor, element offset of each U_i from it); packs the Us when they
    do not share one buffer with unit column strides."""
    def packed(us):
        return (len({u.untyped_storage().data_ptr() for u in us}) == 1
                and all(u.stride(1) == 1 or u.shape[1] == 1 for u in us))

    if not packed(Us):
        Us = pack_factors(Us)
    base = min(Us, key=lambda u: u.data_ptr())
    return Us, base, [(u.data_ptr() - base.data_ptr()) // u.element_size() for u in Us]


def launch_expand(h, Us, tile: TileConfig | None = None, out_dtype=None, out=None):
    """``y[:, cols_i] = h[:, ranks_i] @ U_iᵀ`` → [T, Σ m_i] (the group's fused output).

    ``h`` [T, Σ r_i] (any strides), ``Us`` [m_i, r_i] (1 to :data:`MAX_SLICES`; packed into one
    buffer if they are not already, see :func:`pack_factors`). ``tile.split_k`` must be 1.
    """
    tile = tile or plans.INTERPRETER_PLAN.expand
    if tile.split_k != 1:
        raise ValueError(f"the grouped expand never splits its reduction; tile.split_k is "
                         f"{tile.split_k}")
    T = h.shape[0]
    Us, base, offsets = _slices(Us)
    slices = len(Us)
    ms = [u.shape[0] for u in Us] + [0] * (MAX_SLICES - slices)
    rs = [u.shape[1] for u in Us] + [0] * (MAX_SLICES - slices)
    row_strides = [u.stride(0) for u in Us] + [0] * (MAX_SLICES - slices)
    offsets = offsets + [0] * (MAX_SLICES - slices)
    if out is None:
        out = torch.empty((T, sum(ms)), device=h.device, dtype=out_dtype or h.dtype)
    wide = (needs_offset_64(h, out)
            or any(o + max(m - 1, 0) * st + r > INT32_MAX for o, m, st, r
                   in zip(offsets, ms, row_strides, rs)))
    grid = (triton.cdiv(T, tile.block_m) * max(triton.cdiv(m, tile.block_n) for m in ms),
            slices)
    svf_expand_kernel[grid](
        h, base, out, T, *offsets, *ms, *rs, *row_strides, *h.stride(), *out.stride(),
        DOT_FP32=dot_fp32(base.dtype), OFFSET_64=wide, **tile.meta(split=False),
        **launch_options(tile))
    return out


def launch_group(x, Us, S, Vh, idx, Z=None, alpha=None, bank=None, plan: SVFPlan | None = None,
                 deterministic: bool = True):
    """``y[t] = cat_i U_i @ (S_i * z_{idx[t], i} * (Vh_i @ x[t]))`` → [T, Σ m_i] in x's dtype.

    ``Us`` [m_i, r_i]; ``S`` [R], ``Vh`` [R, n] and ``Z`` [slots, R] (or ``alpha`` [slots, K]
    with ``bank`` [K, R]) stacked over the slices (R = Σ r_i). ``plan`` defaults to
    :func:`group_plan`. Two launches (a third, a memset, only for split plans).
    """
    plan = plan or group_plan(x, Us, Vh, deterministic)
    h = launch_shrink(x, Vh, S, idx, Z=Z, alpha=alpha, bank=bank, tile=plan.shrink,
                      h_dtype=plan.h_dtype(x.dtype))
    return launch_expand(h, Us, tile=plan.expand, out_dtype=x.dtype)

