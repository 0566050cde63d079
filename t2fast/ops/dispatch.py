"""The one dispatch point between t2fast's layers (Hugging Face and vLLM) and its backends; the
only caller of ``torch.ops.t2fast.*`` (:mod:`t2fast.ops.custom_ops`).

Backends (the public op ``svf_<op>`` runs the custom op ``torch.ops.t2fast.svf_<op>_triton`` or
:func:`t2fast.ops.torch_backend.svf_group_torch`; :mod:`t2fast.ops.reference` holds the
float32/float64 ``svf_<op>_reference`` versions, the tests' oracle):
    ``"triton"``  the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
    ``"torch"``   torch ops in the activation dtype (:mod:`t2fast.ops.torch_backend`)
    ``"auto"``    on CUDA, the backend of the kernel plan for this shape and token count (the
                  shipped config table's entry, else the heuristic: :func:`t2fast.kernels.
                  plans.plan`), chosen inside the custom op at run time so a compiled graph
                  keeps no per-T branch; triton for CPU tensors when the interpreter is on; torch
                  otherwise. The same everywhere: the HF and the vLLM layers both call here.

Row determinism: with ``deterministic=True`` (the default) the plans are batch-invariant — a
row's output is bit-identical whatever the other rows and whatever T (no split reductions, one
reduction order at every bucket), and ``auto`` runs the Triton kernels at every T (switching to
the composition at a bucket edge would change a row's rounding). ``deterministic=False`` opts in
to the order-dependent plans: split-K shrinks with fp32 atomics at decode and the table's
backend per bucket (the composition where it measured faster). The torch backend makes no
bitwise promise (cuBLAS and oneDNN choose algorithms by shape).

Groups: :func:`svf_group` / :func:`svf_group_mix` run up to three matrices that read the same
input (q/k/v, gate/up) as one shrink over their stacked ``Vh`` and one expand writing the fused
output — two kernel launches per group.

Every entry point validates shapes, dtypes and devices and raises ``ValueError``/``TypeError``
naming the argument. Checks that need a device sync (index range, finite α) run when
``validate=True`` (the default); layers that build their own indices pass ``validate=False``.

Autograd: the torch backend is differentiable in every input. The triton backend is
differentiable in ``x`` and in ``Z`` (or ``alpha`` and ``bank``) for one matrix; the factors U,
S, Vh are frozen (SVF trains z only), and asking for their gradient is an error. The grouped ops
serve inference only: asking them for a gradient is an error.
"""
from __future__ import annotations

import torch

from ..config import BACKENDS
from ..kernels import launch
from ..kernels.launch import MAX_SLICES
from ..triton_import import LazyModule, register_custom_ops, triton_available
from . import torch_backend
from .checks import (INDEX_DTYPES, KERNEL_DTYPES, check_dim, check_finite, check_index_range,
                     check_same_device, check_same_dtype, check_svf_factors, check_tensor)
from .reference import mix_experts_reference, svf_merge_reference

# Imported with Triton on first use (the custom ops too: t2fast.triton_import.
# register_custom_ops), so the torch backend runs where Triton is not installed.
scaled_matmul_kernels = LazyModule("t2fast.kernels.scaled_matmul")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto", "triton", "torch") to what runs on ``device``: "torch", or
    "triton" — the kernels' custom op, which under ``"auto"`` on CUDA still follows the plan's
    backend per token count (see the module docstring). Resolving "triton" registers the custom
    ops; the HF and vLLM layers resolve when built, and a caller that compiles the ops itself
    (``torch.compile(fullgraph=True)``) must resolve first: a trace cannot import them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernels_can_run = device.type == "cuda" or launch.interpreter_active()
    if backend == "auto":
        backend = "triton" if kernels_can_run and triton_available() else "torch"
    elif backend == "triton" and not kernels_can_run:
        raise ValueError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                         f"kernels on the CPU through Triton's interpreter; tensors are on "
                         f"{device}. Use backend='torch' or 'auto'.")
    if backend == "triton":
        register_custom_ops()
    return backend


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


def _check_group(x, Us, S, Vh) -> tuple[int, int]:
    """Check a group's Us (1 to MAX_SLICES of [m_i, r_i]), stacked S [R] and Vh [R, n] and x
    [T, n]; return (Σ m_i, R)."""
    if not isinstance(Us, (list, tuple)) or not 1 <= len(Us) <= MAX_SLICES:
        raise ValueError(f"Us must be a list of 1 to {MAX_SLICES} U matrices (the group's "
                         f"slices), got {type(Us).__name__} of length "
                         f"{len(Us) if isinstance(Us, (list, tuple)) else '-'}")
    for i, U in enumerate(Us):
        check_tensor(f"Us[{i}]", U, 2)
        check_same_dtype(f"Us[{i}]", U, "Us[0]", Us[0])
    R = sum(U.shape[1] for U in Us)
    check_tensor("S", S, 1)
    check_tensor("Vh", Vh, 2)
    check_dim("S", S, 0, R, "the group's total rank R = sum of U.shape[1] over Us")
    check_dim("Vh", Vh, 0, R, "the group's total rank R = sum of U.shape[1] over Us")
    check_tensor("x", x, 2)
    if x.shape[1] != Vh.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must equal "
                         f"Vh.shape[1] = {Vh.shape[1]} (the layer's input size); flatten "
                         f"leading batch dimensions to [T, {Vh.shape[1]}]")
    return sum(U.shape[0] for U in Us), R


def _dispatch(x, Us, S, Vh, idx, *, backend, validate, deterministic, group, Z=None,
              alpha=None, bank=None):
    """Validate the slot inputs, then run the custom op or the torch backend."""
    mix = Z is None
    m = sum(U.shape[0] for U in Us)
    R = S.shape[0]
    if mix:
        _check_alpha_bank(alpha, bank, R)
        slot_tensors = dict(alpha=alpha, bank=bank)
    else:
        check_tensor("Z", Z, 2)
        check_dim("Z", Z, 1, R, "the rank r = U.shape[1]" if not group else
                  "the group's total rank R")
        slot_tensors = dict(Z=Z)
    _check_idx(idx, x.shape[0])
    factors = {f"Us[{i}]": U for i, U in enumerate(Us)} if group else dict(U=Us[0])
    device = check_same_device(x=x, **factors, S=S, Vh=Vh, **slot_tensors, idx=idx)
    resolved = resolve_backend(backend, device)
    _check_kernel_inputs(resolved, x=x, **factors, S=S, Vh=Vh, **slot_tensors)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, *Us, S, Vh, *slot_tensors.values()))
    if group and resolved == "triton" and needs_grad:
        raise ValueError("the grouped Triton ops serve inference only (no autograd); run them "
                         "under torch.no_grad() or use backend='torch'")
    if validate:
        num_slots = (alpha if mix else Z).shape[0]
        check_index_range(idx, num_slots)
        if mix:
            check_finite("alpha", alpha)
    if x.shape[0] == 0:
        if not needs_grad:
            return x.new_empty((0, m))
        resolved = "torch"          # no rows: the torch composition keeps the autograd graph
    if resolved == "torch":
        Zt = mix_experts_reference(alpha, bank) if mix else Z
        return torch_backend.svf_group_torch(x, Us, S, Vh, Zt, idx)
    flags = dict(auto=backend == "auto", deterministic=deterministic)
    S, idx = S.contiguous(), idx.contiguous()
    if group:
        Us = list(Us)
        if mix:
            return torch.ops.t2fast.svf_group_mix_triton(x, Us, S, Vh, alpha, bank, idx, **flags)
        return torch.ops.t2fast.svf_group_triton(x, Us, S, Vh, Z, idx, **flags)
    if mix:
        return torch.ops.t2fast.svf_matmul_mix_triton(x, Us[0], S, Vh, alpha, bank, idx,
                                                      **flags)
    return torch.ops.t2fast.svf_matmul_triton(x, Us[0], S, Vh, Z, idx, **flags)


def svf_matmul(x, U, S, Vh, Z, idx, *, backend: str = "auto", validate: bool = True,
               deterministic: bool = True):
    """Per-token SVF linear map ``y[t] = U @ (S * Z[idx[t]] * (Vh @ x[t]))``.

    Args:
        x:   [T, n] fp16/bf16/fp32 (fp64 with the torch backend); any strides.
        U:   [m, r] left singular vectors.
        S:   [r] singular values.
        Vh:  [r, n] right singular vectors as rows (``torch.linalg.svd``'s ``Vh``).
        Z:   [num_slots, r] z vector of each slot.
        idx: [T] int32/int64 slot of each token, in [0, num_slots).
        deterministic: batch-invariant plans (see the module docstring).
    Returns:
        y [T, m] in x's dtype, accumulated in fp32.
    """
    check_svf_factors(U, S, Vh, x)
    return _dispatch(x, [U], S, Vh, idx, Z=Z, backend=backend, validate=validate,
                     deterministic=deterministic, group=False)


def svf_matmul_mix(x, U, S, Vh, alpha, bank, idx, *, backend: str = "auto",
                   validate: bool = True, deterministic: bool = True):
    """:func:`svf_matmul` with each slot's z mixed inside the kernel: ``z_s = alpha[s] @ bank``.

    Args:
        alpha: [num_slots, K] mixing weights of each slot (finite).
        bank:  [K, r] the K experts' z vectors for this matrix.
        (x, U, S, Vh, idx as in :func:`svf_matmul`.)
    A request then carries only its K weights instead of an r-vector per adapted matrix.
    """
    check_svf_factors(U, S, Vh, x)
    return _dispatch(x, [U], S, Vh, idx, alpha=alpha, bank=bank, backend=backend,
                     validate=validate, deterministic=deterministic, group=False)


def svf_group(x, Us, S, Vh, Z, idx, *, backend: str = "auto", validate: bool = True,
              deterministic: bool = True):
    """The matrices of a group that read one input, as one op: ``y = cat_i y_i`` with
    ``y_i[t] = U_i @ (S_i * Z_i[idx[t]] * (Vh_i @ x[t]))``.

    Args:
        x:   [T, n].
        Us:  list of 1-3 [m_i, r_i] (e.g. q, k, v: GQA's k/v have their own m_i and r_i).
        S:   [R] the slices' singular values stacked (R = Σ r_i).
        Vh:  [R, n] the slices' Vh stacked along the rank.
        Z:   [num_slots, R] each slot's z vectors, stacked the same way.
        idx: [T] slot of each token.
    Returns:
        y [T, Σ m_i] in x's dtype: slice i's columns after slice i-1's.
    """
    _check_group(x, Us, S, Vh)
    return _dispatch(x, Us, S, Vh, idx, Z=Z, backend=backend, validate=validate,
                     deterministic=deterministic, group=True)


def svf_group_mix(x, Us, S, Vh, alpha, bank, idx, *, backend: str = "auto",
                  validate: bool = True, deterministic: bool = True):
    """:func:`svf_group` with z mixed in the kernel from alpha [num_slots, K] and the stacked
    expert bank [K, R]."""
    _check_group(x, Us, S, Vh)
    return _dispatch(x, Us, S, Vh, idx, alpha=alpha, bank=bank, backend=backend,
                     validate=validate, deterministic=deterministic, group=True)


def _check_alpha_bank(alpha, bank, r=None) -> None:
    check_tensor("alpha", alpha, 2)
    check_tensor("bank", bank, 2)
    k = bank.shape[0]
    if alpha.shape[1] != k:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}: it needs one weight per expert "
                         f"of the bank, i.e. alpha.shape[1] == bank.shape[0] == {k}")
    if r is not None:
        check_dim("bank", bank, 1, r, "the rank r = U.shape[1] (of a group: the total rank R)")


def stack_group(Us, Ss, Vhs):
    """The layout the grouped ops read, built once per layer: the slices' U_i [m_i, r_i] copied
    into one buffer (returned as views of it, 16-element aligned), their S_i and Vh_i stacked
    along the rank → (Us, S [R], Vh [R, n]). Pass views of the results (``S[a:b]``,
    ``Vh[a:b]``) where a single matrix is needed, so nothing is held twice."""
    Us, Ss, Vhs = list(Us), list(Ss), list(Vhs)
    if not 1 <= len(Us) == len(Ss) == len(Vhs) <= MAX_SLICES:
        raise ValueError(f"a group has 1 to {MAX_SLICES} slices, each with U, S and Vh; got "
                         f"{len(Us)} U, {len(Ss)} S and {len(Vhs)} Vh")
    for i, (U, S, Vh) in enumerate(zip(Us, Ss, Vhs)):
        check_tensor(f"Us[{i}]", U, 2)
        check_tensor(f"Ss[{i}]", S, 1)
        check_tensor(f"Vhs[{i}]", Vh, 2)
        check_dim(f"Ss[{i}]", S, 0, U.shape[1], f"Us[{i}].shape[1] (slice {i}'s rank)")
        check_dim(f"Vhs[{i}]", Vh, 0, U.shape[1], f"Us[{i}].shape[1] (slice {i}'s rank)")
        check_dim(f"Vhs[{i}]", Vh, 1, Vhs[0].shape[1], "Vhs[0].shape[1] (the input size)")
        check_same_dtype(f"Us[{i}]", U, "Us[0]", Us[0])
        check_same_dtype(f"Ss[{i}]", S, "Ss[0]", Ss[0])
        check_same_dtype(f"Vhs[{i}]", Vh, "Vhs[0]", Vhs[0])
    check_same_device(**{f"{k}[{i}]": t for k, ts in (("Us", Us), ("Ss", Ss), ("Vhs", Vhs))
                         for i, t in enumerate(ts)})
    return launch.pack_factors(Us), torch.cat(Ss), torch.cat(Vhs).contiguous()


def mix_experts(alpha, bank):
    """Mix expert z vectors: ``alpha`` [num_slots, K] @ ``bank`` [K, r] → Z [num_slots, r].

    Returned in float32 (float64 if an input is float64). Non-finite ``alpha`` is rejected.
    """
    _check_alpha_bank(alpha, bank)
    check_same_device(alpha=alpha, bank=bank)
    check_finite("alpha", alpha)
    return mix_experts_reference(alpha, bank)


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
        return svf_merge_reference(U, S, z, Vh)
    scale = S.float() * z.float()
    return scaled_matmul_kernels.launch_scaled_matmul(U, Vh, scale=scale, out_dtype=U.dtype)
