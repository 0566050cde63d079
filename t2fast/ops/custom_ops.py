"""The ``"triton"`` backend: the kernels as torch custom ops (``torch.ops.t2fast.*_triton``),
called only by :mod:`t2fast.ops.dispatch`, whose public op of the same name without ``_triton``
validates the inputs first.

    svf_matmul_triton      one matrix, per-slot z table Z [slots, r]        (autograd: x, Z)
    svf_matmul_mix_triton  one matrix, z mixed from alpha [slots, K] and bank [K, r]
                           (autograd: x, alpha, bank)
    svf_group_triton       a group of 1-3 matrices reading one input (q/k/v, gate/up), stacked
                           factors                                  (no autograd: serving only)
    svf_group_mix_triton   the same with the expert bank            (no autograd: serving only)

Each op is opaque to ``torch.compile`` (with a fake implementation) and captured whole by CUDA
graphs. With ``auto`` set, the op runs the backend of the kernel plan for this shape and token
count (:func:`t2fast.kernels.plans.plan`): the Triton kernels, or the torch composition where
the plan names it. Deciding inside the op keeps that choice out of compiled graphs, so one
compiled model serves every token count. ``deterministic`` selects the batch-invariant plans
(the default) or the order-dependent ones (:mod:`t2fast.kernels.plans`).
"""
from __future__ import annotations

import torch

from ..kernels import shrink_expand
from . import torch_backend
from .reference import mix_experts_reference


def run_group(x, Us, S, Vh, idx, Z=None, alpha=None, bank=None, auto: bool = False,
              deterministic: bool = True) -> torch.Tensor:
    """The group's output [T, Σ m_i] through the plan's backend (see the module docstring)."""
    plan = shrink_expand.group_plan(x, Us, Vh, deterministic)
    if auto and plan.backend == "torch":
        if Z is None:
            Z = mix_experts_reference(alpha, bank)
        return torch_backend.svf_group_torch(x, Us, S, Vh, Z, idx)
    return shrink_expand.launch_group(x, Us, S, Vh, idx, Z=Z, alpha=alpha, bank=bank,
                                      plan=plan)


@torch.library.custom_op("t2fast::svf_matmul_triton", mutates_args=())
def svf_matmul_triton(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                      Z: torch.Tensor, idx: torch.Tensor, auto: bool = False,
                      deterministic: bool = True) -> torch.Tensor:
    """One matrix with a per-slot z table Z [slots, r]."""
    return run_group(x, [U], S, Vh, idx, Z=Z, auto=auto, deterministic=deterministic)


@torch.library.custom_op("t2fast::svf_matmul_mix_triton", mutates_args=())
def svf_matmul_mix_triton(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                          alpha: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor,
                          auto: bool = False, deterministic: bool = True) -> torch.Tensor:
    """One matrix with z mixed in the kernel from alpha [slots, K] and bank [K, r]."""
    return run_group(x, [U], S, Vh, idx, alpha=alpha, bank=bank, auto=auto,
                     deterministic=deterministic)


@torch.library.custom_op("t2fast::svf_group_triton", mutates_args=())
def svf_group_triton(x: torch.Tensor, Us: list[torch.Tensor], S: torch.Tensor, Vh: torch.Tensor,
                     Z: torch.Tensor, idx: torch.Tensor, auto: bool = False,
                     deterministic: bool = True) -> torch.Tensor:
    """A group with stacked S [R], Vh [R, n], Z [slots, R] → [T, Σ m_i]."""
    return run_group(x, Us, S, Vh, idx, Z=Z, auto=auto, deterministic=deterministic)


@torch.library.custom_op("t2fast::svf_group_mix_triton", mutates_args=())
def svf_group_mix_triton(x: torch.Tensor, Us: list[torch.Tensor], S: torch.Tensor,
                         Vh: torch.Tensor, alpha: torch.Tensor, bank: torch.Tensor,
                         idx: torch.Tensor, auto: bool = False,
                         deterministic: bool = True) -> torch.Tensor:
    """A group with the stacked expert bank [K, R] mixed by alpha [slots, K] → [T, Σ m_i]."""
    return run_group(x, Us, S, Vh, idx, alpha=alpha, bank=bank, auto=auto,
                     deterministic=deterministic)


@svf_matmul_triton.register_fake
def _svf_matmul_fake(x, U, S, Vh, Z, idx, auto=False, deterministic=True):
    return x.new_empty((x.shape[0], U.shape[0]))


@svf_matmul_mix_triton.register_fake
def _svf_matmul_mix_fake(x, U, S, Vh, alpha, bank, idx, auto=False, deterministic=True):
    return x.new_empty((x.shape[0], U.shape[0]))


@svf_group_triton.register_fake
def _svf_group_fake(x, Us, S, Vh, Z, idx, auto=False, deterministic=True):
    return x.new_empty((x.shape[0], sum(U.shape[0] for U in Us)))


@svf_group_mix_triton.register_fake
def _svf_group_mix_fake(x, Us, S, Vh, alpha, bank, idx, auto=False, deterministic=True):
    return x.new_empty((x.shape[0], sum(U.shape[0] for U in Us)))


# ------------------------------------------------------------------------------------ autograd

def _input_grads(grad_y, x, U, S, Vh, z_tok):
    """Gradients of y = U (S z_tok (Vh x)) per token: (grad_x, grad of z_tok [T, r] fp32)."""
    g = grad_y.float() @ U.float()             # [T, r]
    a = x.float() @ Vh.float().T               # [T, r]
    grad_x = ((S.float() * z_tok) * g) @ Vh.float()
    return grad_x.to(x.dtype), S.float() * a * g


def _slot_grad(grad_ztok, idx, num_slots):
    out = torch.zeros((num_slots, grad_ztok.shape[1]), device=grad_ztok.device,
                      dtype=torch.float32)
    return out.index_add_(0, idx.long(), grad_ztok)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _svf_matmul_backward(ctx, grad_y):
    """U, S, Vh are frozen (SVF trains z); idx and the flags have no gradient."""
    x, U, S, Vh, Z, idx = ctx.saved_tensors
    grad_x, grad_ztok = _input_grads(grad_y, x, U, S, Vh, Z.float()[idx.long()])
    grad_Z = _slot_grad(grad_ztok, idx, Z.shape[0]).to(Z.dtype)
    return grad_x, None, None, None, grad_Z, None, None, None


def _svf_matmul_mix_backward(ctx, grad_y):
    x, U, S, Vh, alpha, bank, idx = ctx.saved_tensors
    Z = alpha.float() @ bank.float()
    grad_x, grad_ztok = _input_grads(grad_y, x, U, S, Vh, Z[idx.long()])
    grad_Z = _slot_grad(grad_ztok, idx, alpha.shape[0])
    grad_alpha = (grad_Z @ bank.float().T).to(alpha.dtype)
    grad_bank = (alpha.float().T @ grad_Z).to(bank.dtype)
    return grad_x, None, None, None, grad_alpha, grad_bank, None, None, None


svf_matmul_triton.register_autograd(_svf_matmul_backward, setup_context=_setup)
svf_matmul_mix_triton.register_autograd(_svf_matmul_mix_backward, setup_context=_setup)
