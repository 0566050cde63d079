"""Tile code shared by the SVF kernel bodies: tile order, offsets and the fp32-accumulating dot.

Both SVF steps are GEMMs ``out[M, N] = A[M, K] @ B[K, N]`` over tokens (M = T):
    shrink  A = x [T, n],  B = Vhᵀ [n, r]   (N = r, K = n)
    expand  A = h [T, r],  B = Uᵀ  [r, m]   (N = m, K = r)
so they share the block names BLOCK_M (tokens), BLOCK_N (output features), BLOCK_K (reduction)
and the split of the reduction SPLIT_K.

Offsets are int32 unless the launcher sets ``OFFSET_64`` (:func:`t2fast.kernels.launch.
needs_offset_64`): then every row, column and reduction offset is int64 before it meets a stride,
so ``offs * stride`` cannot wrap once T·m or T·n reaches 2^31.

Reduction order: a program reduces its k-blocks in ascending order, chaining one ``tl.dot`` per
block into one fp32 accumulator; with SPLIT_K == 1 every row of a tile is reduced the same way
whatever the other rows of the tile are, which is what makes a row's output independent of its
batch (see :mod:`t2fast.kernels.plans`).
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


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 OFFSET_64: tl.constexpr):
    """Row and column offsets (and their masks) of output tile ``pid`` of an [M, N] output."""
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if OFFSET_64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def reduce_tile(a_ptr, b_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, K, split,
                stride_am, stride_ak, stride_bk, stride_bn,
                HAS_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
                OFFSET_64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``Σ_k (A ⊙ scale)[offs_m, k] B[k, offs_n]`` over this program's k-blocks.

    Split ``split`` (of SPLIT_K) reduces the k-blocks split, split + SPLIT_K, ... in ascending
    order. Masked loads fill with 0, so ragged edges add nothing.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if OFFSET_64:
            offs_k = offs_k.to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * sc[None, :]
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(a, b, acc, DOT_FP32)
    return acc
