"""Launch helpers shared by the SVF ops: interpreter detection, dot precision, launch options,
64-bit offsets, the grouped factor layout (:func:`pack_factors`). No Triton import here.

The kernels live with their launchers (:mod:`.shrink_expand`, :mod:`.scaled_matmul`); the custom
ops that call them are :mod:`t2fast.ops.custom_ops`. Nothing here synchronizes with the host.
"""
from __future__ import annotations

import os

import torch

from .plans import TileConfig


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_fp32(weight_dtype: torch.dtype) -> bool:
    """The kernels' ``DOT_FP32`` for weights (the dot's B operand) of ``weight_dtype``.

    IEEE fp32 dots for fp32 weights (no silent TF32) and under the interpreter (its bf16 dot is
    inexact). Otherwise the A tile is cast to the weights' dtype in registers, so an fp32
    activation tile (the split shrink's ``h``) meeting bf16/fp16 ``U`` still runs on tensor
    cores. The launchers and the ahead-of-time gates (:mod:`.aot`) both take it from here.
    """
    return interpreter_active() or weight_dtype == torch.float32


#: Triton fuses a*b + c into one FMA unless told otherwise; the default changes from on to
#: off in Triton 3.10 (``TRITON_DEFAULT_FP_FUSION``). Every kernel asks for it explicitly, so
#: results (and every measurement) do not change with the Triton version or the environment.
FP_FUSION = True


def compile_options(tile: TileConfig) -> dict:
    """The compile options of a tile: ``num_warps``, ``num_stages`` and :data:`FP_FUSION`
    (the launchers' and the ahead-of-time compiler's alike)."""
    return dict(num_warps=tile.num_warps, num_stages=tile.num_stages,
                enable_fp_fusion=FP_FUSION)


def launch_options(tile: TileConfig) -> dict:
    """:func:`compile_options` for a launch (the interpreter takes none)."""
    return {} if interpreter_active() else compile_options(tile)


# Largest element offset the kernels address with int32 arithmetic.
INT32_MAX = 2**31 - 1


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset of ``t`` from its first element: Σ (size - 1) · stride."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def needs_offset_64(*tensors: torch.Tensor) -> bool:
    """The kernels' ``OFFSET_64``: True when an offset into one of ``tensors`` exceeds int32
    (e.g. x [T, n] or y [T, m] once T·n or T·m reaches 2^31), so the kernel computes offsets in
    int64. Decided from shapes and strides on the host: no device sync."""
    return any(max_offset(t) > INT32_MAX for t in tensors)


# Matrices one grouped expand serves (q, k, v).
MAX_SLICES = 3


def pack_factors(Us) -> list[torch.Tensor]:
    """The group's U_i [m_i, r_i] as views of one contiguous buffer (what the grouped expand
    reads); each slice starts at a multiple of 16 elements. Layers pack once at load
    time; :func:`.shrink_expand.launch_expand` packs (copies) only matrices that are not packed yet.
    Plain torch, here beside the launch helpers so that layers stack their factors (through
    :func:`t2fast.ops.stack_group`) without importing Triton."""
    Us = list(Us)
    sizes = [U.numel() for U in Us]
    starts, at = [], 0
    for n in sizes:
        starts.append(at)
        at += -(-n // 16) * 16
    flat = torch.empty(at, device=Us[0].device, dtype=Us[0].dtype)
    views = []
    for U, start, n in zip(Us, starts, sizes):
        v = flat[start:start + n].view(U.shape)
        v.copy_(U)
        views.append(v)
    return views
