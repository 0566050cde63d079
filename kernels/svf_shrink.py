"""Shrink kernel: ``h[t] = S ⊙ z_{slot(t)} ⊙ (Vh @ x[t])``, the first half of an SVF matmul.

Kernel body only; launch code lives in :mod:`t2fast.kernels.launch`.

Shapes (row-major strides are passed explicitly, so inputs need not be contiguous):
    x     [T, n]          fp16 / bf16 / fp32
    Vh    [r, n]          right singular vectors as rows (``torch.linalg.svd``'s ``Vh``)
    S     [r]             singular values
    Z     [slots, r]      per-slot z table                      (MIX = False)
    alpha [slots, K]      per-slot mixing weights               (MIX = True)
    bank  [K, r]          expert bank, mixed on the fly         (MIX = True)
    idx   [T]             int32/int64 slot of each token
    h     [T, r]          fp32 output (zero-filled by the launcher when SPLIT_N > 1)

Grid: (cdiv(T, BLOCK_T), cdiv(r, BLOCK_R), SPLIT_N). With SPLIT_N > 1 the n-reduction is split
across programs that each scale their partial sum and ``atomic_add`` it into ``h`` (the scale is
linear, so scaling partials is exact up to fp32 rounding); this keeps small-T (decode) launches
wide enough to fill the GPU.
"""
import triton
import triton.language as tl


@triton.jit
def _dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc += a @ b`` with fp32 accumulation.

    DOT_FP32 casts both tiles to fp32 and asks for IEEE precision: used for fp32 inputs (no
    silent TF32) and under the interpreter, whose bf16 ``tl.dot`` is not exact. Otherwise ``a`` is
    cast to ``b``'s dtype (e.g. an fp32 intermediate meeting bf16 weights) for tensor cores.
    """
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def svf_shrink_kernel(
    x_ptr, vh_ptr, s_ptr, z_ptr, alpha_ptr, bank_ptr, idx_ptr, h_ptr,
    T, N, R, K,
    stride_xt, stride_xn,
    stride_vr, stride_vn,
    stride_zs, stride_zr,
    stride_as, stride_ak,
    stride_bk, stride_br,
    stride_ht, stride_hr,
    T_BUCKET,  # autotune key only (T rounded up to a power of two)
    MIX: tl.constexpr,
    SPLIT_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < R

    # This program reduces the n-blocks pid_k, pid_k + SPLIT_N, ...
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(pid_k * BLOCK_N, N, BLOCK_N * SPLIT_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        x_tile = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
            mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        # Vh tile read transposed: [BLOCK_N, BLOCK_R]
        v_tile = tl.load(
            vh_ptr + offs_r[None, :] * stride_vr + offs_n[:, None] * stride_vn,
            mask=mask_r[None, :] & mask_n[:, None], other=0.0)
        acc = _dot_acc(x_tile, v_tile, acc, DOT_FP32)

    # Epilogue: scale by sigma and by each token's z (gathered or mixed).
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=0)
    sigma = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mask_tr = mask_t[:, None] & mask_r[None, :]
    if MIX:
        z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k in range(0, K):
            a_k = tl.load(alpha_ptr + slot * stride_as + k * stride_ak,
                          mask=mask_t, other=0.0).to(tl.float32)
            e_k = tl.load(bank_ptr + k * stride_bk + offs_r * stride_br,
                          mask=mask_r, other=0.0).to(tl.float32)
            z += a_k[:, None] * e_k[None, :]
    else:
        z = tl.load(z_ptr + slot[:, None] * stride_zs + offs_r[None, :] * stride_zr,
                    mask=mask_tr, other=0.0).to(tl.float32)
    h = acc * sigma[None, :] * z

    h_ptrs = h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr
    if SPLIT_N == 1:
        tl.store(h_ptrs, h, mask=mask_tr)
    else:
        tl.atomic_add(h_ptrs, h, mask=mask_tr)
