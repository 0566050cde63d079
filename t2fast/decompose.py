"""SVD of the adapted weights, cached on disk by a hash of each weight.

``W = U diag(S) Vh`` with ``W`` [m, n] (``y = W x``), ``r = min(m, n)``: U [m, r], S [r] (descending),
Vh [r, n]. Factors are computed in float64 on the CPU when the matrix is small enough to be cheap,
float32 otherwise (on whatever device the weight lives on), and stored in float32.

Cache files are safetensors named ``<sha256 of the weight>.safetensors`` holding U, S, Vh and
metadata (format, version, shape, dtype). A file that cannot be read or does not match is
recomputed and overwritten, with a warning that names it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .safetensors_io import T2FileError, read_file, write_file
from .targets import resolve_targets

SVD_FORMAT = "t2fast-svd"
SVD_VERSION = "1"
FLOAT64_MAX_ELEMENTS = 1 << 22  # ~4M elements: float64 SVD on the CPU is still quick


@dataclass
class SVDFactors:
    """Thin SVD of one weight: U [m, r], S [r], Vh [r, n], all float32 on one device."""
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.Vh.shape[1])

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def reconstruct(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """``U diag(S ⊙ z) Vh`` in float32 (z = 1 when omitted)."""
        s = self.S if z is None else self.S * z.to(self.S)
        return (self.U * s) @ self.Vh

    def to(self, device=None) -> "SVDFactors":
        return SVDFactors(self.U.to(device), self.S.to(device), self.Vh.to(device))


def weight_hash(weight: torch.Tensor) -> str:
    """sha256 over the weight's shape, dtype and bytes (computed on a CPU copy)."""
    w = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def decompose_weight(weight: torch.Tensor) -> SVDFactors:
    """Thin SVD of ``weight`` [m, n] → float32 factors on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach()
    if w.device.type == "cpu" and w.numel() <= FLOAT64_MAX_ELEMENTS:
        U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    else:
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    return SVDFactors(U.float().contiguous(), S.float().contiguous(), Vh.float().contiguous())


def relative_error(weight: torch.Tensor, factors: SVDFactors) -> float:
    """‖W − U diag(S) Vh‖_F / ‖W‖_F."""
    w = weight.detach().float()
    err = torch.linalg.norm(w - factors.reconstruct().to(w.device))
    return float(err / torch.linalg.norm(w).clamp_min(1e-30))


def default_cache_dir() -> Path:
    """``$T2FAST_CACHE/svd`` or ``~/.cache/t2fast/svd``."""
    root = os.environ.get("T2FAST_CACHE") or Path.home() / ".cache" / "t2fast"
    return Path(root) / "svd"


class SVDCache:
    """On-disk cache of :class:`SVDFactors` keyed by :func:`weight_hash`."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int]) -> SVDFactors | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            t, meta = read_file(path, "decomposition", SVD_FORMAT, (SVD_VERSION,))
            f = SVDFactors(t["U"], t["S"], t["Vh"])
            if f.shape != tuple(shape) or f.U.shape[1] != f.rank or f.Vh.shape[0] != f.rank:
                raise T2FileError(f"holds factors of shape {f.shape}, expected {tuple(shape)}")
        except (T2FileError, KeyError) as exc:
            warnings.warn(f"ignoring SVD cache file {str(path)!r} ({exc}); recomputing",
                          stacklevel=2)
            return None
        return f

    def get_or_compute(self, weight: torch.Tensor) -> tuple[SVDFactors, bool]:
        """Factors of ``weight`` on its device, and whether they came from the cache."""
        key = weight_hash(weight)
        cached = self.load(key, tuple(weight.shape))
        if cached is not None:
            self.hits += 1
            return cached.to(weight.device), True
        self.misses += 1
        f = decompose_weight(weight)
        write_file(self.path(key), {"U": f.U, "S": f.S, "Vh": f.Vh}, SVD_FORMAT, SVD_VERSION,
                   {"shape": list(f.shape), "weight_dtype": str(weight.dtype)})
        return f, False


@dataclass
class Decomposition:
    """Factors of a model's adapted matrices, in model order, with reconstruction errors."""
    factors: dict[str, SVDFactors]
    errors: dict[str, float]
    cache_hits: int = 0

    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    def report(self) -> str:
        worst = max(self.errors.items(), key=lambda kv: kv[1])
        return (f"{len(self.factors)} matrices decomposed ({self.cache_hits} from cache); "
                f"max relative reconstruction error {worst[1]:.2e} ({worst[0]})")


def decompose_modules(modules: dict[str, nn.Linear], cache_dir=None, progress: bool = True,
                      ) -> Decomposition:
    """SVD of each ``nn.Linear``'s weight; ``cache_dir=False`` disables the disk cache."""
    cache = None if cache_dir is False else SVDCache(cache_dir)
    factors, errors, hits = {}, {}, 0
    for name, mod in tqdm(modules.items(), desc="SVD", disable=not progress, leave=False):
        w = mod.weight
        if cache is None:
            f, hit = decompose_weight(w), False
        else:
            f, hit = cache.get_or_compute(w)
        factors[name] = f
        errors[name] = relative_error(w, f)
        hits += int(hit)
    return Decomposition(factors, errors, hits)


def decompose_model(model: nn.Module, targets="all", layers=None, cache_dir=None,
                    progress: bool = True) -> Decomposition:
    """Decompose the target matrices of ``model`` (see :func:`t2fast.targets.resolve_targets`)."""
    names = resolve_targets(model, targets, layers)
    mods = dict(model.named_modules())
    return decompose_modules({n: mods[n] for n in names}, cache_dir=cache_dir, progress=progress)
