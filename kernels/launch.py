"""Launch wrappers for the SVF Triton kernels.

These functions assume validated inputs (shapes, devices, dtypes are checked once by the
dispatch layer in :mod:`t2fast.ops`); they only pick block sizes and launch.

Block sizes: under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) small fixed blocks and
no autotuning; on a GPU ``triton.autotune`` over a short list of configs keyed on the problem
shape (T bucketed by powers of two, so decode and prefill tune separately without retuning for
every T).
"""
import os

import torch
import triton

from .scaled_matmul import scaled_matmul_kernel
from .svf_shrink import svf_shrink_kernel


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed configs under the interpreter: small blocks keep the numpy emulation fast.
_INTERP_SHRINK = dict(BLOCK_T=16, BLOCK_R=32, BLOCK_N=32)
_INTERP_MATMUL = dict(BLOCK_P=16, BLOCK_Q=32, BLOCK_R=32, GROUP_P=4)


def _t_bucket(t: int) -> int:
    return 1 << max(0, int(t - 1).bit_length())


def _shrink_configs():
    cfgs = []
    for bt in (16, 64):
        for br in (64, 128):
            for bn in (64, 128):
                for split in (1, 4, 16):
                    for warps in (4, 8):
                        cfgs.append(triton.Config(
                            dict(BLOCK_T=bt, BLOCK_R=br, BLOCK_N=bn, SPLIT_N=split),
                            num_warps=warps, num_stages=3))
    for split in (1, 2):
        cfgs.append(triton.Config(dict(BLOCK_T=128, BLOCK_R=128, BLOCK_N=64, SPLIT_N=split),
                                  num_warps=8, num_stages=3))
    return cfgs


def _prune_shrink(configs, named_args, **kwargs):
    """Decode-sized T gets small BLOCK_T; prefill-sized T gets no split (already wide)."""
    t = named_args["T"]
    keep = [c for c in configs
            if (c.kwargs["BLOCK_T"] <= max(16, t))
            and not (t >= 512 and c.kwargs["SPLIT_N"] > 2)]
    return keep or configs[:1]


def _matmul_configs():
    cfgs = []
    for bp, bq, br, warps, stages in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 32, 4, 4),
    ):
        cfgs.append(triton.Config(dict(BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=br, GROUP_P=8),
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _prune_matmul(configs, named_args, **kwargs):
    p = named_args["P"]
    keep = [c for c in configs if c.kwargs["BLOCK_P"] <= max(16, _t_bucket(p))]
    return keep or configs[:1]


_tuned = {}


def _autotuned(name):
    """Autotuned kernel wrappers, built on first GPU use (never under the interpreter)."""
    if name not in _tuned:
        if name == "shrink":
            _tuned[name] = triton.autotune(
                configs=_shrink_configs(), key=["T_BUCKET", "N", "R", "K", "MIX"],
                prune_configs_by={"early_config_prune": _prune_shrink},
                reset_to_zero=["h_ptr"],
            )(svf_shrink_kernel)
        else:
            _tuned[name] = triton.autotune(
                configs=_matmul_configs(), key=["P_BUCKET", "Q", "R", "HAS_SCALE"],
                prune_configs_by={"early_config_prune": _prune_matmul},
            )(scaled_matmul_kernel)
    return _tuned[name]


def _dot_fp32(*tensors) -> bool:
    return interpreter_active() or any(t.dtype == torch.float32 for t in tensors)


def svf_shrink(x, Vh, S, idx, Z=None, alpha=None, bank=None, split_n=None, out=None):
    """``h[t] = S * z_{idx[t]} * (Vh @ x[t])`` as an fp32 tensor [T, r].

    Either ``Z`` [slots, r] (a per-slot table) or ``alpha`` [slots, K] with ``bank`` [K, r]
    (mixed inside the kernel). ``split_n`` forces the n-split (tests); by default it is 1 under
    the interpreter and autotuned on GPU. ``out`` (fp32 [T, r]) is written when given, and
    must be zero-filled when the n-split is > 1.
    """
    T, N = x.shape
    R = Vh.shape[0]
    mix = Z is None
    if mix:
        z_arg, zs = alpha, (0, 0)
        K = bank.shape[0]
        a_s, b_s = alpha.stride(), bank.stride()
    else:
        z_arg, zs = Z, Z.stride()
        K = 0
        alpha, bank = Z, Z  # unused pointers when MIX is off
        a_s, b_s = (0, 0), (0, 0)
    common = (x, Vh, S, z_arg, alpha, bank, idx)
    strides = (*x.stride(), *Vh.stride(), *zs, *a_s, *b_s)
    if interpreter_active() or split_n is not None:
        split = split_n or 1
        h = out if out is not None else (torch.zeros if split > 1 else torch.empty)(
            (T, R), device=x.device, dtype=torch.float32)
        blocks = _INTERP_SHRINK if interpreter_active() else dict(BLOCK_T=16, BLOCK_R=64,
                                                                  BLOCK_N=64)
        grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(R, blocks["BLOCK_R"]), split)
        svf_shrink_kernel[grid](*common, h, T, N, R, K, *strides, *h.stride(), _t_bucket(T),
                                MIX=mix, SPLIT_N=split, DOT_FP32=_dot_fp32(x, Vh), **blocks)
        return h
    h = torch.zeros((T, R), device=x.device, dtype=torch.float32) if out is None else out.zero_()

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(R, meta["BLOCK_R"]),
                meta["SPLIT_N"])
    _autotuned("shrink")[grid](*common, h, T, N, R, K, *strides, *h.stride(), _t_bucket(T),
                               MIX=mix, DOT_FP32=_dot_fp32(x, Vh))
    return h


def scaled_matmul(A, B, scale=None, out_dtype=None, out=None):
    """``(A * scale[None, :]) @ B`` → [P, Q] in ``out_dtype`` (default A's dtype).

    ``A`` [P, R], ``B`` [R, Q] with any strides (pass ``U.t()`` for Uᵀ), ``scale`` [R] or None;
    ``out`` [P, Q] (any strides) is written when given.
    """
    P, R = A.shape
    Q = B.shape[1]
    if out is None:
        out = torch.empty((P, Q), device=A.device, dtype=out_dtype or A.dtype)
    args = (A, scale if scale is not None else A, B, out, P, Q, R,
            *A.stride(), *B.stride(), *out.stride(), _t_bucket(P))
    has_scale = scale is not None
    if interpreter_active():
        b = _INTERP_MATMUL
        grid = (triton.cdiv(P, b["BLOCK_P"]) * triton.cdiv(Q, b["BLOCK_Q"]),)
        scaled_matmul_kernel[grid](*args, HAS_SCALE=has_scale, DOT_FP32=True, **b)
        return out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]),)
    _autotuned("matmul")[grid](*args, HAS_SCALE=has_scale, DOT_FP32=_dot_fp32(A, B))
    return out
