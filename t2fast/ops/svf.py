"""The one dispatch point between t2fast's layers and its backends.

Backends:
    ``"triton"``  the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
    ``"torch"``   torch ops in the activation dtype (:mod:`t2fast.ops.torch_backend`)
    ``"auto"``    on CUDA, the backend the kernel plan names for this shape and token count
                  (the shipped config table records which one measured faster; triton where
                  nothing was measured); triton for CPU tensors when the interpreter is on;
                  torch otherwise

Every entry point validates shapes, dtypes and devices and raises ``ValueError``/``TypeError``
naming the argument. Checks that need a device sync (index range, finite α) run when
``validate=True`` (the default); layers that build their own indices pass ``validate=False``.

Autograd: the torch backend is differentiable in every input. The triton backend is
differentiable in ``x`` and in ``Z`` (or ``alpha`` and ``bank``); the factors U, S, Vh are frozen
(SVF trains z only), and asking for their gradient is an error.
"""
from __future__ import annotations

import torch

from ..config import BACKENDS
from ..kernels import launch, scaled_matmul, svf_matmul as svf_op
from . import reference, torch_backend
from .checks import (INDEX_DTYPES, KERNEL_DTYPES, check_dim, check_finite, check_index_range,
                     check_same_device, check_svf_factors, check_tensor)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto", "triton", "torch") to the backend that will run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" or launch.interpreter_active() else "torch"
    if backend == "triton" and device.type != "cuda" and not launch.interpreter_active():
        raise ValueError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                         f"kernels on the CPU through Triton's interpreter; tensors are on "
                         f"{device}. Use backend='torch' or 'auto'.")
    return backend


def _auto_backend(asked: str, resolved: str, x, U, Vh) -> str:
    """``"auto"`` on CUDA takes the backend of the kernel plan for this shape and T."""
    if asked == "auto" and resolved == "triton" and x.device.type == "cuda":
        return svf_op.svf_plan(x, U, Vh).backend
    return resolved


def _check_kernel_inputs(backend: str, **tensors) -> None:
    if backend != "triton":
        return
    for name, t in tensors.items():
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32; {name} is "
                            f"{str(t.dtype).replace('torch.', '')} (use backend='torch' for "
                            f"float64)")
        if name in ("U", "S", "Vh") and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"backend='triton' treats the SVD factors as constants, but {name} "
                             f"requires grad; detach it or use backend='torch'")


def _check_idx(idx, T: int) -> None:
    check_tensor("idx", idx, 1, INDEX_DTYPES)
    if idx.shape[0] != T:
        raise ValueError(f"idx has shape {tuple(idx.shape)}: it needs one slot per token of x, "
                         f"i.e. shape ({T},)")


def svf_matmul(x, U, S, Vh, Z, idx, *, backend: str = "auto", validate: bool = True):
    """Per-token SVF linear map ``y[t] = U @ (S * Z[idx[t]] * (Vh @ x[t]))``.

    Args:
        x:   [T, n] fp16/bf16/fp32 (fp64 with the torch backend); any strides.
        U:   [m, r] left singular vectors.
        S:   [r] singular values.
        Vh:  [r, n] right singular vectors as rows (``torch.linalg.svd``'s ``Vh``).
        Z:   [num_slots, r] z vector of each slot.
        idx: [T] int32/int64 slot of each token, in [0, num_slots).
    Returns:
        y [T, m] in x's dtype, accumulated in fp32.
    """
    m, r, n = check_svf_factors(U, S, Vh, x)
    check_tensor("Z", Z, 2)
    check_dim("Z", Z, 1, r, "the rank r = U.shape[1]")
    _check_idx(idx, x.shape[0])
    device = check_same_device(x=x, U=U, S=S, Vh=Vh, Z=Z, idx=idx)
    backend = _auto_backend(backend, resolve_backend(backend, device), x, U, Vh)
    _check_kernel_inputs(backend, x=x, U=U, S=S, Vh=Vh, Z=Z)
    if validate:
        check_index_range(idx, Z.shape[0])
    if x.shape[0] == 0:
        return x.new_empty((0, m))
    if backend == "torch":
        return torch_backend.svf_matmul(x, U, S, Vh, Z, idx)
    return torch.ops.t2fast.svf_matmul(x, U, S.contiguous(), Vh, Z, idx.contiguous())


def svf_matmul_mix(x, U, S, Vh, alpha, bank, idx, *, backend: str = "auto",
                   validate: bool = True):
    """:func:`svf_matmul` with each slot's z mixed inside the kernel: ``z_s = alpha[s] @ bank``.

    Args:
        alpha: [num_slots, K] mixing weights of each slot (finite).
        bank:  [K, r] the K experts' z vectors for this matrix.
        (x, U, S, Vh, idx as in :func:`svf_matmul`.)
    A request then carries only its K weights instead of an r-vector per adapted matrix.
    """
    m, r, n = check_svf_factors(U, S, Vh, x)
    _check_alpha_bank(alpha, bank, r)
    _check_idx(idx, x.shape[0])
    device = check_same_device(x=x, U=U, S=S, Vh=Vh, alpha=alpha, bank=bank, idx=idx)
    backend = _auto_backend(backend, resolve_backend(backend, device), x, U, Vh)
    _check_kernel_inputs(backend, x=x, U=U, S=S, Vh=Vh, alpha=alpha, bank=bank)
    if validate:
        check_index_range(idx, alpha.shape[0])
        check_finite("alpha", alpha)
    if x.shape[0] == 0:
        return x.new_empty((0, m))
    if backend == "torch":
        return torch_backend.svf_matmul_mix(x, U, S, Vh, alpha, bank, idx)
    return torch.ops.t2fast.svf_matmul_mix(x, U, S.contiguous(), Vh, alpha, bank,
                                           idx.contiguous())


def _check_alpha_bank(alpha, bank, r=None) -> None:
    check_tensor("alpha", alpha, 2)
    check_tensor("bank", bank, 2)
    k = bank.shape[0]
    if alpha.shape[1] != k:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}: it needs one weight per expert "
                         f"of the bank, i.e. alpha.shape[1] == bank.shape[0] == {k}")
    if r is not None:
        check_dim("bank", bank, 1, r, "the rank r = U.shape[1]")


def mix_experts(alpha, bank):
    """Mix expert z vectors: ``alpha`` [num_slots, K] @ ``bank`` [K, r] → Z [num_slots, r].

    Returned in float32 (float64 if an input is float64). Non-finite ``alpha`` is rejected.
    """
    _check_alpha_bank(alpha, bank)
    check_same_device(alpha=alpha, bank=bank)
    check_finite("alpha", alpha)
    return reference.mix_experts(alpha, bank)


def svf_merge(U, S, z, Vh, *, backend: str = "auto"):
    """Merged weight ``W' = U diag(S * z) Vh``: U [m, r], S [r], z [r], Vh [r, n] → [m, n].

    Returned in U's dtype (fp32 accumulation); the single-mixture fast path serves it densely.
    """
    check_svf_factors(U, S, Vh)
    check_tensor("z", z, 1)
    check_dim("z", z, 0, U.shape[1], "the rank r = U.shape[1]")
    device = check_same_device(U=U, S=S, z=z, Vh=Vh)
    backend = resolve_backend(backend, device)
    _check_kernel_inputs(backend, U=U, S=S, z=z, Vh=Vh)
    if backend == "torch":
        return reference.svf_merge(U, S, z, Vh)
    scale = S.float() * z.float()
    return scaled_matmul.scaled_matmul(U, Vh, scale=scale, out_dtype=U.dtype)
