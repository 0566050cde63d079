"""Launch helpers shared by the SVF ops: interpreter detection, dot precision, launch options.

The ops themselves live one per file (:mod:`.svf_matmul`, :mod:`.scaled_matmul`): kernel body,
launcher and custom op together. Nothing here synchronizes with the host.
"""
from __future__ import annotations

import os

import torch

from .configs import TileConfig


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_fp32(*tensors) -> bool:
    """IEEE fp32 dots for fp32 operands and under the interpreter (its bf16 dot is inexact)."""
    return interpreter_active() or any(t.dtype == torch.float32 for t in tensors)


def launch_options(tile: TileConfig) -> dict:
    """``num_warps`` / ``num_stages`` of a tile (the interpreter takes neither)."""
    if interpreter_active():
        return {}
    return dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
