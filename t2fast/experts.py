"""SVF experts: one z vector per adapted matrix, their files, banks and α mixtures.

Expert file (safetensors): one float32 tensor [r] per adapted matrix, keyed by its Hugging Face
module name (``model.layers.0.mlp.down_proj``), and metadata::

    format           "t2fast-expert"
    format_version   "1"
    name             the expert's name
    base_model       name of the base model it was trained on
    fingerprint_json {"shapes": sha256 of (name, shape) of every target,
                      "sigma_sums": {target: Σσ}}  — identifies the base weights
    targets_json     [target names, model order]
    shapes_json      {target: [m, n]}
    extra_json       free-form (training config, scores ...)

A **bank** stacks K experts over the same targets. A **mixture** α gives ``z' = Σ_k α_k z_k``;
slot 0 of every bank matrix is the base model (z = 1), so "base" is a mixture too.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decompose import SVDFactors
from .safetensors_io import T2FileError, read_file, write_file

EXPERT_FORMAT = "t2fast-expert"
EXPERT_VERSION = "1"
BASE = "base"
SIGMA_RTOL = 1e-3


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a base model's adapted matrices: names and shapes exactly, σ sums loosely."""
    shapes: str
    sigma_sums: dict

    @classmethod
    def of(cls, factors: dict[str, SVDFactors]) -> "Fingerprint":
        desc = json.dumps([[n, list(f.shape)] for n, f in factors.items()])
        sums = {n: float(f.S.double().sum()) for n, f in factors.items()}
        return cls(hashlib.sha256(desc.encode()).hexdigest(), sums)

    def to_json(self) -> dict:
        return {"shapes": self.shapes, "sigma_sums": self.sigma_sums}

    def mismatch(self, other: "Fingerprint") -> str | None:
        """Why ``other`` is a different base model, or None when it is the same."""
        common = set(self.sigma_sums) & set(other.sigma_sums)
        differ = [n for n in common
                  if not math.isclose(self.sigma_sums[n], other.sigma_sums[n], rel_tol=SIGMA_RTOL)]
        if differ:
            return (f"the singular values of {len(differ)} matrices differ (e.g. {differ[0]}: "
                    f"Σσ {other.sigma_sums[differ[0]]:.6g} vs {self.sigma_sums[differ[0]]:.6g})")
        return None


@dataclass
class Expert:
    """A named set of z vectors, one float32 [r] per target matrix."""
    name: str
    z: dict[str, torch.Tensor]
    base_model: str = ""
    fingerprint: Fingerprint | None = None
    extra: dict = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return list(self.z)

    @classmethod
    def ones(cls, name: str, factors: dict[str, SVDFactors], base_model: str = "") -> "Expert":
        """The identity expert (z = 1 everywhere) for ``factors``."""
        return cls(name, {n: torch.ones(f.rank) for n, f in factors.items()}, base_model,
                   Fingerprint.of(factors))

    @classmethod
    def random(cls, name: str, factors: dict[str, SVDFactors], scale: float = 0.1,
               seed: int = 0, base_model: str = "") -> "Expert":
        """z = 1 + scale·N(0, 1), a stand-in expert for demos and tests."""
        g = torch.Generator().manual_seed(seed)
        z = {n: 1 + scale * torch.randn(f.rank, generator=g) for n, f in factors.items()}
        return cls(name, z, base_model, Fingerprint.of(factors))

    def save(self, path) -> Path:
        """Write the expert as a safetensors file (see the module docstring)."""
        for n, v in self.z.items():
            _check_z(n, v, f"expert {self.name!r}")
        meta = {
            "name": self.name,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint.to_json() if self.fingerprint else None,
            "targets": self.targets,
            "shapes": {n: [int(v.shape[0])] for n, v in self.z.items()},
            "extra": self.extra,
        }
        return write_file(path, {n: v.float() for n, v in self.z.items()}, EXPERT_FORMAT,
                          EXPERT_VERSION, meta)

    def check_against(self, factors: dict[str, SVDFactors], fingerprint: Fingerprint | None = None,
                      allow_other_model: bool = False, where: str = "") -> None:
        """Raise :class:`T2FileError` unless this expert fits the decomposition ``factors``.

        Targets must be the same set and each z must have length rank(W). Unless
        ``allow_other_model`` (cross-model transfer between models of equal shapes), the base
        model's fingerprint must match too.
        """
        where = where or f"expert {self.name!r}"
        missing = [n for n in factors if n not in self.z]
        extra = [n for n in self.z if n not in factors]
        if missing or extra:
            raise T2FileError(
                f"{where} does not cover the adapted matrices: "
                + (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "")
                + ("; " if missing and extra else "")
                + (f"{len(extra)} not adapted here (e.g. {extra[:3]})" if extra else ""))
        for n, f in factors.items():
            if self.z[n].shape != (f.rank,):
                raise T2FileError(f"{where}: z for {n} has shape {tuple(self.z[n].shape)}, but "
                                  f"that matrix has rank {f.rank} (shape {f.shape})")
        if allow_other_model or self.fingerprint is None:
            return
        fp = fingerprint or Fingerprint.of(factors)
        if self.fingerprint.shapes != fp.shapes:
            raise T2FileError(f"{where} was made for a base model with other matrix shapes "
                              f"({self.base_model or 'unnamed'})")
        why = fp.mismatch(self.fingerprint)
        if why:
            raise T2FileError(f"{where} was trained on another base model "
                              f"({self.base_model or 'unnamed'}): {why}; pass "
                              f"allow_other_model=True for cross-model transfer")


def _check_z(name: str, v, where: str) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        raise T2FileError(f"{where}: z for {name} must be a 1-D float tensor, got "
                          f"{getattr(v, 'shape', type(v).__name__)}")
    if not bool(torch.isfinite(v).all()):
        raise T2FileError(f"{where}: z for {name} contains NaN or Inf")


def load_expert(path, factors: dict[str, SVDFactors] | None = None,
                allow_other_model: bool = False) -> Expert:
    """Read an expert file; with ``factors``, check it fits that decomposition.

    Raises :class:`t2fast.safetensors_io.T2FileError` (a ``ValueError``) naming the problem:
    missing/truncated file, wrong format, NaN/Inf, missing or extra matrices, wrong lengths,
    another base model.
    """
    tensors, meta = read_file(path, "expert", EXPERT_FORMAT, (EXPERT_VERSION,))
    where = f"expert file {str(path)!r}"
    listed = meta.get("targets")
    if listed is not None and sorted(listed) != sorted(tensors):
        raise T2FileError(f"{where}: metadata lists {len(listed)} targets but the file holds "
                          f"{len(tensors)} tensors")
    for n, v in tensors.items():
        _check_z(n, v, where)
    order = listed or list(tensors)
    fp = meta.get("fingerprint")
    expert = Expert(
        name=meta.get("name") or Path(path).stem,
        z={n: tensors[n].float() for n in order},
        base_model=meta.get("base_model", ""),
        fingerprint=Fingerprint(fp["shapes"], fp["sigma_sums"]) if fp else None,
        extra=meta.get("extra") or {},
    )
    if factors is not None:
        expert.check_against(factors, allow_other_model=allow_other_model, where=where)
    return expert


class ExpertBank:
    """K experts over the same targets, stacked per matrix with the base (z = 1) as row 0.

    ``bank(target)`` → float32 [K + 1, r]; mixtures are α vectors of length K + 1 (see
    :meth:`alpha`), per layer when given as [num_layers, K].
    """

    def __init__(self, experts: list[Expert], factors: dict[str, SVDFactors]):
        names = [e.name for e in experts]
        if len(set(names)) != len(names) or BASE in names:
            raise ValueError(f"expert names must be unique and not {BASE!r}; got {names}")
        for e in experts:
            e.check_against(factors, allow_other_model=True)
        self.experts = list(experts)
        self.targets = list(factors)
        self._banks = {
            n: torch.stack([torch.ones(f.rank)] + [e.z[n].float().cpu() for e in experts])
            for n, f in factors.items()
        }

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def __len__(self) -> int:
        return len(self.experts)

    def bank(self, target: str) -> torch.Tensor:
        """[K + 1, r] float32 on the CPU: row 0 the base (ones), then the experts in order."""
        return self._banks[target]

    def alpha(self, spec, num_layers: int = 1) -> torch.Tensor:
        """Parse a mixture into α of shape [num_layers, K + 1] (column 0 = base).

        ``spec`` may be: ``None`` or ``"base"``; an expert name; a dict ``{name: weight}`` (may
        include ``"base"``); a list/tensor of K weights in bank order; or a tensor
        [num_layers, K] (per-layer α). Unknown names and non-finite or wrong-length α raise
        ``ValueError``.
        """
        K = len(self.experts)
        out = torch.zeros(num_layers, K + 1, dtype=torch.float32)
        if spec is None or (isinstance(spec, str) and spec == BASE):
            out[:, 0] = 1.0
            return out
        if isinstance(spec, str):
            out[:, 1 + self._index(spec)] = 1.0
            return out
        if isinstance(spec, dict):
            for name, w in spec.items():
                col = 0 if name == BASE else 1 + self._index(name)
                out[:, col] = _finite_weight(w, f"alpha[{name!r}]")
            return out
        a = torch.as_tensor(spec, dtype=torch.float32)
        if a.dim() == 1 and a.shape[0] == K:
            out[:, 1:] = a
        elif a.dim() == 2 and a.shape == (num_layers, K):
            out[:, 1:] = a
        else:
            raise ValueError(f"alpha has shape {tuple(a.shape)}: expected ({K},) (one weight per "
                             f"expert in bank order {self.names}) or ({num_layers}, {K}) "
                             f"(per layer)")
        if not bool(torch.isfinite(out).all()):
            raise ValueError("alpha contains NaN or Inf")
        return out

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown expert {name!r}; loaded experts: "
                             f"{self.names or '(none)'} (or 'base')") from None


def _finite_weight(w, what: str) -> float:
    try:
        v = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {w!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v
