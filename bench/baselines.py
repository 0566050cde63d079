"""The implementations every SVF benchmark compares, on one problem definition.

A problem is one adapted matrix W [m, n] (factors U [m, r], S [r], Vh [r, n]), T tokens x [T, n],
S distinct mixtures (Z [S, r], or α [S, K] over a bank [K, r]) and the token → slot map idx [T].
"""
from dataclasses import dataclass

import torch

from t2fast import ops
from t2fast.ops import torch_backend
from t2fast.ops.reference import svf_matmul_reference
from timing import l2_cold_copies


@dataclass
class Problem:
    x: torch.Tensor
    W: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    Z: torch.Tensor
    alpha: torch.Tensor
    bank: torch.Tensor
    idx: torch.Tensor

    @property
    def bytes_factors(self) -> int:
        return (self.U.numel() + self.Vh.numel()) * self.U.element_size()

    @property
    def bytes_io(self) -> int:
        T, m = self.x.shape[0], self.U.shape[0]
        return (self.x.numel() + T * m) * self.x.element_size()

    @property
    def flops_factored(self) -> int:
        T, r = self.x.shape[0], self.S.shape[0]
        return 2 * T * r * (self.U.shape[0] + self.Vh.shape[1])

    @property
    def flops_dense(self) -> int:
        return 2 * self.x.shape[0] * self.W.numel()


def make_problem(m, n, T, slots, dtype=torch.bfloat16, device="cpu", K=4, seed=0) -> Problem:
    """Random factors of a full-rank W (orthonormal U, Vh; decaying σ) and per-token slots
    (int32 indices, as the layers' slot map). Drawn on the CPU (reproducible), orthonormalised
    and multiplied on ``device`` (a 4096² QR takes seconds on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g).to(device))[0]
    Vh = torch.linalg.qr(torch.randn(n, r, generator=g).to(device))[0].T
    S = torch.linspace(1.0, 0.05, r, device=device)
    W = (U * S) @ Vh
    bank = 1 + 0.1 * torch.randn(K, r, generator=g)
    alpha = torch.softmax(torch.randn(slots, K, generator=g), dim=-1)
    idx = torch.randint(0, slots, (T,), generator=g)
    idx[:slots] = torch.arange(min(slots, T))          # every slot used when S <= T
    x = torch.randn(T, n, generator=g)
    cast = dict(device=device, dtype=dtype)
    return Problem(x.to(**cast), W.to(**cast), U.to(**cast), S, Vh.to(**cast),
                   (alpha @ bank).to(device), alpha.to(device), bank.to(device),
                   idx.to(device=device, dtype=torch.int32))


def dense(p: Problem):
    """The base layer: x @ Wᵀ (cuBLAS / MKL). The floor for any SVF path."""
    return p.x @ p.W.T


def svf_triton(p: Problem):
    """t2fast's kernels with a per-slot z table."""
    return ops.svf_matmul(p.x, p.U, p.S, p.Vh, p.Z, p.idx, backend="triton", validate=False)


def svf_triton_mix(p: Problem):
    """t2fast's kernels mixing z from α and the bank inside the kernel."""
    return ops.svf_matmul_mix(p.x, p.U, p.S, p.Vh, p.alpha, p.bank, p.idx, backend="triton",
                              validate=False)


def torch_composition(p: Problem):
    """The three lines a user would write, in the activation dtype (cuBLAS, fp32 accumulate)."""
    return ((p.x @ p.Vh.T) * (p.S * p.Z[p.idx]).to(p.x.dtype)) @ p.U.T


def reference_fp32(p: Problem):
    """The float32 reference (:func:`t2fast.ops.reference.svf_matmul_reference`: gather + two
    matmuls, half weights copied to fp32): what every benchmarked SVF path is checked against."""
    return svf_matmul_reference(p.x, p.U, p.S, p.Vh, p.Z, p.idx)


def materialize_per_mixture(p: Problem):
    """Build W' = U diag(σ ⊙ z_s) Vh for each distinct mixture s and apply it to its tokens."""
    y = torch.empty(p.x.shape[0], p.U.shape[0], device=p.x.device, dtype=p.x.dtype)
    for s in torch.unique(p.idx).tolist():
        rows = (p.idx == s).nonzero().squeeze(1)
        w = (p.U * (p.S * p.Z[s]).to(p.U.dtype)) @ p.Vh
        y[rows] = p.x[rows] @ w.T
    return y


# ---------------------------------------------------------------- groups (one op per input)

@dataclass
class GroupProblem:
    """Matrices that read one input (q/k/v, gate/up; or one matrix): slices W_i [m_i, n] with
    factors stacked as ``t2fast.ops.stack_group`` lays them out, and ``W`` = cat(W_i), the fused
    dense weight vLLM holds."""
    x: torch.Tensor
    W: torch.Tensor
    Us: list
    S: torch.Tensor
    Vh: torch.Tensor
    Z: torch.Tensor
    alpha: torch.Tensor
    bank: torch.Tensor
    idx: torch.Tensor

    @property
    def bytes_factors(self) -> int:
        return (sum(U.numel() for U in self.Us) + self.Vh.numel()) * self.Vh.element_size()

    @property
    def bytes_dense(self) -> int:
        return self.W.numel() * self.W.element_size()

    @property
    def flops_factored(self) -> int:
        T, n = self.x.shape
        return 2 * T * sum(U.shape[1] * (U.shape[0] + n) for U in self.Us)


def make_group(slices, T, slots, dtype=torch.bfloat16, device="cpu", K=4, seed=0
               ) -> GroupProblem:
    """A group of ``slices`` [(m_i, n), ...] built from :func:`make_problem` per slice (one x,
    idx, α shared by all)."""
    parts = [make_problem(m, n, T, slots, dtype, device, K, seed * 7 + i)
             for i, (m, n) in enumerate(slices)]
    Us, S, Vh = ops.stack_group([p.U for p in parts], [p.S for p in parts],
                                [p.Vh for p in parts])
    bank = torch.cat([p.bank for p in parts], dim=1)
    first = parts[0]
    return GroupProblem(first.x, torch.cat([p.W for p in parts]), Us, S, Vh,
                        (first.alpha @ bank).to(device), first.alpha, bank, first.idx)


def l2_cold_groups(slices, T, dtype, device, reads=("factors", "dense")) -> list[GroupProblem]:
    """Distinct copies of one group, enough that the weights of the lightest timed call
    exceed L2 several times over: ``reads`` names what each call reads ("factors", "dense",
    "U": an expand alone, "Vh": a shrink alone), and the copies follow the smallest."""
    first = make_group(slices, T, T, dtype, device)
    size = first.Vh.element_size()
    read = {"factors": first.bytes_factors, "dense": first.bytes_dense,
            "U": sum(U.numel() for U in first.Us) * size, "Vh": first.Vh.numel() * size}
    return [first] + [make_group(slices, T, T, dtype, device, seed=s)
                      for s in range(1, l2_cold_copies(min(read[k] for k in reads)))]


def group_dense(p: GroupProblem):
    """The base layer: one fused GEMM x @ Wᵀ."""
    return p.x @ p.W.T


def group_triton(p: GroupProblem):
    """t2fast's grouped kernels with a per-slot z table (two launches)."""
    return ops.svf_group(p.x, p.Us, p.S, p.Vh, p.Z, p.idx, backend="triton", validate=False)


def group_triton_mix(p: GroupProblem):
    """The grouped kernels mixing z from α and the bank (what the vLLM layers run)."""
    return ops.svf_group_mix(p.x, p.Us, p.S, p.Vh, p.alpha, p.bank, p.idx, backend="triton",
                             validate=False)


def group_composition(p: GroupProblem):
    """The composition in the activation dtype: one matmul over the stacked Vh, one per slice."""
    return torch_backend.svf_group_torch(p.x, p.Us, p.S, p.Vh, p.Z, p.idx)
