"""The SVF matmul op ``y[t] = U (S ⊙ z_{slot(t)} ⊙ (Vh x[t]))``: shrink kernel, launchers,
custom ops.

Two kernels: the shrink below (``h = S ⊙ z ⊙ (x Vhᵀ)``) and the expand ``y = h Uᵀ``
(:mod:`.scaled_matmul`); plans (tiles, splits, h's dtype) come from :mod:`.configs`. The op is
registered as ``torch.ops.t2fast.svf_matmul`` and ``torch.ops.t2fast.svf_matmul_mix`` (opaque to
``torch.compile``, with fake implementations and autograd through x and z / α and the bank), and
both :mod:`t2fast.ops` and the vLLM layers call it. Inputs are not checked here: call through
:mod:`t2fast.ops`, which validates them.

The shrink kernel:

Shapes (strides are passed explicitly, so inputs need not be contiguous):
    x     [T, n]          fp16 / bf16 / fp32
    Vh    [r, n]          right singular vectors as rows (``torch.linalg.svd``'s ``Vh``)
    S     [r]             singular values (fp32)
    Z     [slots, r]      per-slot z table                      (MIX = False)
    alpha [slots, K]      per-slot mixing weights               (MIX = True)
    bank  [K, r]          expert bank, mixed on the fly         (MIX = True)
    idx   [T]             int32/int64 slot of each token
    h     [T, r]          fp32 (zero-filled by the launcher when SPLIT_K > 1), or x's dtype

Grid: (cdiv(T, BLOCK_M) · cdiv(r, BLOCK_N) in grouped order, SPLIT_K). The scale S ⊙ z is applied
in fp32 in the epilogue, before any rounding. With SPLIT_K > 1 the n-reduction is split across
programs that scale their partial sums (the scale is linear) and add them into ``h`` with
relaxed fp32 atomics: that keeps decode launches (T ≤ 64, one row tile) wide enough to fill the
GPU. The order of those additions is not fixed, so split results vary in the last fp32 bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import SVFPlan, TileConfig
from .launch import dot_fp32, interpreter_active, launch_options
from .scaled_matmul import scaled_matmul
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_t, offs_r, mask_t, mask_r = tile_offsets(T, R, BLOCK_M, BLOCK_N, GROUP_M)
    # x [T, n] @ Vhᵀ [n, r]: Vhᵀ[k, j] = Vh[j, k]
    acc = reduce_tile(x_ptr, vh_ptr, x_ptr, offs_t, offs_r, mask_t, mask_r, N,
                      stride_xt, stride_xn, stride_vn, stride_vr,
                      False, SPLIT_K, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K)

    # Epilogue: scale by sigma and by each token's z (gathered or mixed), in fp32.
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=0)
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



# ------------------------------------------------------------------------------------ launch

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
        MIX=mix, DOT_FP32=dot_fp32(Vh.dtype), **tile.meta(), **launch_options(tile))
    return out


def svf_matmul(x, U, S, Vh, idx, Z=None, alpha=None, bank=None, plan: SVFPlan | None = None):
    """``y[t] = U @ (S * z_{idx[t]} * (Vh @ x[t]))`` → [T, m] in x's dtype (shrink + expand).

    ``Z`` [slots, r] or ``alpha`` [slots, K] with ``bank`` [K, r] as in :func:`svf_shrink`;
    ``plan`` defaults to :func:`svf_plan`.
    """
    plan = plan or svf_plan(x, U, Vh)
    h = svf_shrink(x, Vh, S, idx, Z=Z, alpha=alpha, bank=bank, tile=plan.shrink,
                   h_dtype=plan.h_dtype(x.dtype))
    return scaled_matmul(h, U.t(), tile=plan.expand, out_dtype=x.dtype)


# -------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("t2fast::svf_matmul", mutates_args=())
def svf_matmul_op(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                  Z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`svf_matmul` with a per-slot z table Z [slots, r], as one op."""
    return svf_matmul(x, U, S, Vh, idx, Z=Z)


@torch.library.custom_op("t2fast::svf_matmul_mix", mutates_args=())
def svf_matmul_mix_op(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                      alpha: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`svf_matmul` with z mixed in the kernel from alpha [slots, K] and bank [K, r]."""
    return svf_matmul(x, U, S, Vh, idx, alpha=alpha, bank=bank)


@svf_matmul_op.register_fake
def _svf_matmul_fake(x, U, S, Vh, Z, idx):
    return x.new_empty((x.shape[0], U.shape[0]))


@svf_matmul_mix_op.register_fake
def _svf_matmul_mix_fake(x, U, S, Vh, alpha, bank, idx):
    return x.new_empty((x.shape[0], U.shape[0]))


def _input_grads(grad_y, x, U, S, Vh, z_tok):
    """Gradients of y = U (S z_tok (Vh x)) per token: (grad_x, grad of z_tok [T, r] fp32)."""
    g = grad_y.float() @ U.float()             # [T, r]
    a = x.float() @ Vh.float().T               # [T, r]
    grad_x = ((S.float() * z_tok) * g) @ Vh.float()
    return grad_x.to(x.dtype), S.float() * a * g


def _slot_grad(grad_ztok, idx, num_slots):
    out = torch.zeros((num_slots, grad_ztok.shape[1]), device=grad_ztok.device,
                      dtype=torch.float32)
    return out.index_add_(0, idx.long(), grad_ztok)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _svf_matmul_backward(ctx, grad_y):
    """U, S, Vh are frozen (SVF trains z); idx has no gradient."""
    x, U, S, Vh, Z, idx = ctx.saved_tensors
    grad_x, grad_ztok = _input_grads(grad_y, x, U, S, Vh, Z.float()[idx.long()])
    grad_Z = _slot_grad(grad_ztok, idx, Z.shape[0]).to(Z.dtype)
    return grad_x, None, None, None, grad_Z, None


def _svf_matmul_mix_backward(ctx, grad_y):
    x, U, S, Vh, alpha, bank, idx = ctx.saved_tensors
    Z = alpha.float() @ bank.float()
    grad_x, grad_ztok = _input_grads(grad_y, x, U, S, Vh, Z[idx.long()])
    grad_Z = _slot_grad(grad_ztok, idx, alpha.shape[0])
    grad_alpha = (grad_Z @ bank.float().T).to(alpha.dtype)
    grad_bank = (alpha.float().T @ grad_Z).to(bank.dtype)
    return grad_x, None, None, None, grad_alpha, grad_bank, None


svf_matmul_op.register_autograd(_svf_matmul_backward, setup_context=_setup)
svf_matmul_mix_op.register_autograd(_svf_matmul_mix_backward, setup_context=_setup)
