"""Shrink kernel: ``h[t] = S ⊙ z_{slot(t)} ⊙ (Vh @ x[t])``, the first half of an SVF matmul.

Kernel body only; plans (block sizes, split, h's dtype) come from :mod:`t2fast.kernels.configs`
and the launch code from :mod:`t2fast.kernels.launch`.

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
import triton
import triton.language as tl

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
