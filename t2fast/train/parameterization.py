"""The two parameterizations of SVF's z vectors.

``plain``     the trained vector is z itself, initialised to 1: W' = U diag(σ ⊙ z) Vᵀ.
``official``  the authors' code: a logit vector p, z = sigmoid(p), and W' rescaled by the scalar
              Σσ / Σ(σ ⊙ z) so that the adapted matrix keeps the base matrix's nuclear norm.
              The scale is folded into z: the *effective* z is sigmoid(p) · Σσ / Σ(σ⊙sigmoid(p)).
              p starts uniform (``init``), so the effective z starts at exactly 1.

Both expose :meth:`ZParameterization.effective` (differentiable effective z per target, what
``SVFHandle.set_trainable_z`` and expert files take) and :meth:`export` (detached float32 on
the CPU). Experts are always stored as effective z, so a bank mixes them linearly whatever the
parameterization used for training.
"""
from __future__ import annotations

import torch
from torch import nn

from ..decompose import SVDFactors

KINDS = ("plain", "official")


class ZParameterization(nn.Module):
    """Trainable z for every target matrix of a decomposition.

    ``init_z`` ({target: z [r]}, e.g. an expert's) starts those targets at that z; under the
    official parameterization, whose effective z is ``m · Σσ / Σ(σ ⊙ m)`` with m in (0, 1),
    that is z itself for a z already so rescaled (an official expert's), else z rescaled. An
    ``init_z`` naming another target, of another length, or (official) not positive is
    refused.
    """

    def __init__(self, factors: dict[str, SVDFactors], kind: str = "plain", init: float = 0.1,
                 init_z: dict[str, torch.Tensor] | None = None, device=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"parameterization must be one of {KINDS}, got {kind!r}")
        if not factors:
            raise ValueError("ZParameterization needs at least one target matrix")
        self.kind = kind
        self.names = list(factors)
        unknown = sorted(set(init_z or {}) - set(factors))
        if unknown:
            raise ValueError(f"init_z names {len(unknown)} matrices that are not targets: "
                             f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
        params = []
        for n, f in factors.items():
            r = f.rank
            if init_z is not None and n in init_z:
                z0 = init_z[n].detach().float().reshape(-1)
                if z0.shape[0] != r:
                    raise ValueError(f"init_z for {n} has length {z0.shape[0]}, expected {r}")
                if kind == "official":
                    if not bool((z0 > 0).all()):
                        raise ValueError(f"init_z for {n}: the official parameterization "
                                         f"holds only positive z")
                    # any m ∝ z gives the same effective z: the largest just below 1
                    z0 = torch.logit(z0 / (z0.max() * (1 + 1e-3)))
                params.append(nn.Parameter(z0.clone().to(device)))
            elif kind == "plain":
                params.append(nn.Parameter(torch.ones(r, dtype=torch.float32, device=device)))
            else:
                params.append(nn.Parameter(torch.full((r,), float(init), dtype=torch.float32,
                                                   device=device)))
        self.params = nn.ParameterList(params)
        for i, f in enumerate(factors.values()):
            self.register_buffer(f"sigma{i}", f.S.detach().float().to(device), persistent=False)

    def sigma(self, i: int) -> torch.Tensor:
        return getattr(self, f"sigma{i}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def effective(self) -> dict[str, torch.Tensor]:
        """Effective z per target (differentiable; plain tensors, never ``nn.Parameter``)."""
        out = {}
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            if self.kind == "plain":
                out[n] = p.view(-1)
            else:
                z = torch.sigmoid(p)
                s = self.sigma(i)
                out[n] = z * (s.sum() / (s * z).sum())
        return out

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().float().cpu().clone() for n, v in self.effective().items()}
