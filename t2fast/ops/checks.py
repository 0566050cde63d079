"""Argument checks for :mod:`t2fast.ops`: every error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; "
                        f"expected one of {names}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: dimension {dim} must equal "
                         f"{what} = {expected}")


def check_same_dtype(name: str, t: torch.Tensor, first_name: str, first: torch.Tensor) -> None:
    """``t`` (one of a group's slices) has the dtype of the group's first, ``first``."""
    if t.dtype != first.dtype:
        raise TypeError(f"{name} is {t.dtype}; every slice of a group must share "
                        f"{first_name}'s dtype {first.dtype}")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"all tensors must be on one device: {first_name} is on {first}, "
                             f"{name} is on {dev}")
    return first


def check_index_range(idx: torch.Tensor, num_slots: int) -> None:
    """Bounds check of a slot index (one device sync; callers on a hot path may skip it)."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_slots:
        raise ValueError(f"idx values must lie in [0, {num_slots}) (Z/alpha has {num_slots} "
                         f"slot rows); got min {lo}, max {hi}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def check_svf_factors(U, S, Vh, x=None):
    """Check U [m, r], S [r], Vh [r, n] (and x [T, n]); return (m, r, n)."""
    check_tensor("U", U, 2)
    check_tensor("S", S, 1)
    check_tensor("Vh", Vh, 2)
    m, r = U.shape
    check_dim("S", S, 0, r, "U.shape[1] (the rank r)")
    check_dim("Vh", Vh, 0, r, "U.shape[1] (the rank r)")
    n = Vh.shape[1]
    if x is not None:
        check_tensor("x", x, 2)
        if x.shape[1] != n:
            raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must equal "
                             f"Vh.shape[1] = {n} (the layer's input size); flatten leading "
                             f"batch dimensions to [T, {n}]")
    return m, r, n
