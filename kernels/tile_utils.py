"""Tile code shared by the SVF kernel bodies: tile order and the fp32-accumulating dot.

Both SVF steps are GEMMs ``out[M, N] = A[M, K] @ B[K, N]`` over tokens (M = T):
    shrink  A = x [T, n],  B = Vhᵀ [n, r]   (N = r, K = n)
    expand  A = h [T, r],  B = Uᵀ  [r, m]   (N = m, K = r)
so they share the block names BLOCK_M (tokens), BLOCK_N (output features), BLOCK_K (reduction)
and the split of the reduction SPLIT_K.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of 1-D program ``pid`` in grouped order.

    GROUP_M row tiles walk one column band together (Triton's matmul tutorial), so a band of
    B stays in L2 while they use it. With a single row tile (decode) this is plain column order.
    """
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_size)
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc += a @ b`` with fp32 accumulation.

    DOT_FP32 casts both tiles to fp32 with IEEE precision: for fp32 inputs (no silent TF32) and
    under Triton's interpreter, whose bf16 ``tl.dot`` is not exact. Otherwise ``a`` is cast to
    ``b``'s dtype (an fp32 ``h`` meeting bf16/fp16 ``U``) so the dot runs on tensor cores
    (``mma.sync`` for tiles of 16-32 tokens, ``wgmma`` from 64 tokens with 4+ warps on sm_90).
    """
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc
