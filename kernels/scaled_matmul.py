"""Scaled matmul kernel: ``out[P, Q] = (A ⊙ scale[None, :]) @ B`` with fp32 accumulation.

One body serves two SVF steps (launch code in :mod:`t2fast.kernels.launch`):
    expand  y[T, m]  = h[T, r] @ Uᵀ            A = h (fp32), B = Uᵀ (strides of U swapped), no scale
    merge   W'[m, n] = U diag(σ ⊙ z) Vh        A = U, scale = σ ⊙ z, B = Vh

Shapes: A [P, R], scale [R] (HAS_SCALE), B [R, Q], out [P, Q] in out's dtype.
Grid: 1-D, cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q) programs in grouped order (GROUP_P row-tiles share
a column band, as in Triton's matmul tutorial, for L2 reuse of B).
"""
import triton
import triton.language as tl

from .svf_shrink import _dot_acc


@triton.jit
def scaled_matmul_kernel(
    a_ptr, scale_ptr, b_ptr, out_ptr,
    P, Q, R,
    stride_ap, stride_ar,
    stride_br, stride_bq,
    stride_op, stride_oq,
    P_BUCKET,  # autotune key only (P rounded up to a power of two)
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_P: tl.constexpr,
):
    pid = tl.program_id(0)
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    in_group = GROUP_P * num_q
    group = pid // in_group
    first_p = group * GROUP_P
    group_size = min(num_p - first_p, GROUP_P)
    pid_p = first_p + ((pid % in_group) % group_size)
    pid_q = (pid % in_group) // group_size

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a = tl.load(a_ptr + offs_p[:, None] * stride_ap + offs_r[None, :] * stride_ar,
                    mask=mask_p[:, None] & mask_r[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * sc[None, :]
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_q[None, :] * stride_bq,
                    mask=mask_r[:, None] & mask_q[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, DOT_FP32)

    out_ptrs = out_ptr + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])
