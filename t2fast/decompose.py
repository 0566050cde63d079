"""SVD of the adapted weights, cached on disk by a hash of each weight.

``W = U diag(S) Vh`` with ``W`` [m, n] (``y = W x``), ``r = min(m, n)``: U [m, r], S [r]
(descending), Vh [r, n]. Factors are computed in float64 on the CPU when the matrix is small
enough to be cheap, float32 otherwise (on whatever device the weight lives on), and stored in
float32.

Cache files are safetensors named ``<sha256 of the weight>.safetensors`` holding U, S, Vh
(float32) and metadata (format, version, shape, dtype). A cache entry is trusted only after a
check against the weight it claims to factor: its header declares float32 factors of the
weight's shapes (checked before any data is read), the factors are finite, σ non-negative and
descending, and ``‖W v − U(σ ⊙ (Vh v))‖ / ‖W v‖ ≤ probe_rtol`` for a few fixed random probe
vectors v (cheap: ``PROBES`` matrix-vector products). ``probe_rtol`` is the loader's
(:class:`SVDCache`'s, default ``PROBE_RTOL``); nothing in a file can loosen it. A file that
cannot be read, does not match or fails the check is recomputed and overwritten, with a warning
that names it and says why.

A cache that cannot be written (a read-only or immutable folder, a path that is a file, a full
disk) does not stop anything: the factors are computed and used, with one warning per
:class:`SVDCache` that says why nothing is cached. A failed write leaves no temporary file.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .safetensors_io import T2FileError, read_file, write_file
from .targets import resolve_targets, target_weights

SVD_FORMAT = "t2fast-svd"
SVD_VERSION = "1"
FLOAT64_MAX_ELEMENTS = 1 << 22  # ~4M elements: float64 SVD on the CPU is still quick
PROBES = 4                      # random probe vectors of the cache check
#: the cache check's tolerance. The factors are computed in float64 or float32 from the weight
#: in float32 whatever its dtype: a fresh SVD's probe error is about 1e-7 (float64) to 1e-5
#: (float32, large matrices).
PROBE_RTOL = 1e-4


@dataclass
class SVDFactors:
    """Thin SVD of one weight: U [m, r], S [r], Vh [r, n] on one device; S is float32, U and Vh
    float32 or (``like_weights``, as :func:`t2fast.patch_model` keeps them) the weight's dtype."""
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
        return (self.U.float() * s) @ self.Vh.float()

    def to(self, device=None) -> "SVDFactors":
        return SVDFactors(self.U.to(device), self.S.to(device), self.Vh.to(device))


def weight_hash(weight: torch.Tensor) -> str:
    """sha256 over the weight's shape, dtype and bytes (computed on a CPU copy)."""
    w = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def decompose_weight(weight: torch.Tensor, name: str = "weight") -> SVDFactors:
    """Thin SVD of ``weight`` [m, n] → float32 factors on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or Inf: it cannot be decomposed (is the model "
                         f"checkpoint damaged?)")
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


def probe_error(weight: torch.Tensor, factors: SVDFactors) -> float:
    """``max_v ‖W v − U(σ ⊙ (Vh v))‖ / ‖W v‖`` over ``PROBES`` fixed random vectors (float32).

    NaN/Inf in the factors give ``inf``.
    """
    w = weight.detach().float()
    g = torch.Generator().manual_seed(0)
    # float32 explicitly: vLLM builds and loads a model under the model's default dtype (bf16)
    v = torch.randn(w.shape[1], PROBES, generator=g, dtype=torch.float32).to(w.device)
    f = factors.to(w.device)
    wv = w @ v
    err = torch.linalg.norm(wv - f.U.float() @ (f.S.float()[:, None] * (f.Vh.float() @ v)),
                            dim=0)
    rel = err / torch.linalg.norm(wv, dim=0).clamp_min(1e-30)
    worst = float(rel.max())
    return worst if math.isfinite(worst) else math.inf


def check_factors(weight: torch.Tensor, factors: SVDFactors, rtol: float) -> str | None:
    """Why ``factors`` are not the SVD of ``weight`` (None when they are, to ``rtol``)."""
    for k in ("U", "S", "Vh"):
        if not bool(torch.isfinite(getattr(factors, k)).all()):
            return f"its {k} contains NaN or Inf"
    S = factors.S
    if bool((S < 0).any()) or bool((S[:-1] < S[1:]).any()):
        return "its singular values are not non-negative and descending"
    err = probe_error(weight, factors)
    if err > rtol:
        return (f"it does not reconstruct the weight: probe error {err:.3g} > tolerance "
                f"{rtol:.3g}")
    return None


def default_cache_dir() -> Path:
    """``$T2FAST_CACHE/svd``, else ``$XDG_CACHE_HOME/t2fast/svd``, else ``~/.cache/t2fast/svd``
    (an empty variable counts as unset, as the XDG base directory spec says)."""
    root = os.environ.get("T2FAST_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2fast"
    return Path(root) / "svd"


class SVDCache:
    """On-disk cache of :class:`SVDFactors` keyed by :func:`weight_hash`.

    ``probe_rtol`` is the tolerance of the check every entry must pass (module docstring).
    """

    def __init__(self, root=None, probe_rtol: float = PROBE_RTOL):
        self.root = Path(root) if root is not None else default_cache_dir()
        if isinstance(probe_rtol, bool) or not isinstance(probe_rtol, (int, float)) or \
                not 0 < probe_rtol < 1:
            raise ValueError(f"probe_rtol must be a number in (0, 1), got {probe_rtol!r}")
        self.probe_rtol = float(probe_rtol)
        self.hits = 0
        self.misses = 0
        self.unwritable: str | None = None    # why the cache could not be written, once it failed

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, weight: torch.Tensor) -> SVDFactors | None:
        """The cached factors of ``weight`` (its hash is ``key``) if the entry exists and passes
        the check (module docstring); else None, with a warning naming the file when it exists
        but is unreadable, of the wrong shape or fails the check."""
        path = self.path(key)
        if weight.dim() != 2 or not path.exists():
            return None
        m, n = weight.shape
        r = min(m, n)
        expected = {"U": (m, r), "S": (r,), "Vh": (r, n)}

        def check_header(infos, meta):
            shapes = {k: i.shape for k, i in infos.items()}
            if shapes != expected:
                raise T2FileError(f"it holds {_describe(shapes)}; expected {_describe(expected)} "
                                  f"for a weight of shape {(m, n)}")

        try:
            t, _ = read_file(path, "decomposition", SVD_FORMAT, (SVD_VERSION,),
                             max_bytes=4 * (m * r + r + r * n), check=check_header)
            f = SVDFactors(t["U"], t["S"], t["Vh"])
            why = check_factors(weight, f, self.probe_rtol)
            if why:
                raise T2FileError(why)
        except T2FileError as exc:
            warnings.warn(f"ignoring SVD cache file {str(path)!r}: {exc}; recomputing it",
                          stacklevel=3)
            return None
        return f

    def get_or_compute(self, weight: torch.Tensor, name: str = "weight"
                       ) -> tuple[SVDFactors, bool]:
        """Factors of ``weight`` on its device, and whether they came from the cache."""
        key = weight_hash(weight)
        cached = self.load(key, weight)
        if cached is not None:
            self.hits += 1
            return cached.to(weight.device), True
        self.misses += 1
        f = decompose_weight(weight, name)
        self.store(key, weight, f, name)
        return f, False

    def store(self, key: str, weight: torch.Tensor, f: SVDFactors, name: str = "weight"
              ) -> None:
        """Write the entry of ``weight`` unless the cache could not be written before; a
        failure warns once and turns writing off (the factors are used all the same)."""
        if self.unwritable is not None:
            return
        err = probe_error(weight, f)
        if err > self.probe_rtol:       # an entry the check would refuse: not worth a file
            warnings.warn(f"not caching the SVD of {name}: its probe error {err:.3g} "
                          f"exceeds the cache check's tolerance {self.probe_rtol:.3g}",
                          stacklevel=3)
            return
        try:
            if self.root.exists() and not self.root.is_dir():
                raise NotADirectoryError(f"{str(self.root)!r} is a file, not a folder")
            write_file(self.path(key), {"U": f.U, "S": f.S, "Vh": f.Vh}, SVD_FORMAT,
                       SVD_VERSION, {"shape": list(f.shape), "weight_dtype": str(weight.dtype)})
        except OSError as exc:
            self.unwritable = exc.strerror or str(exc)
            warnings.warn(f"SVD cache folder {str(self.root)!r} cannot be written "
                          f"({self.unwritable}): the factors are computed and used without "
                          f"caching (pass cache_dir= another folder, or False for none)",
                          stacklevel=3)


def _describe(shapes: dict) -> str:
    return ", ".join(f"{k[:20]} {tuple(v)[:4]}" for k, v in sorted(shapes.items())[:4]) or \
        "no tensors"


@dataclass
class Decomposition:
    """Factors of a model's adapted matrices, in model order, with reconstruction errors:
    ``errors`` of the float32 factors, ``held_errors`` of the factors cast to a half-precision
    weight's dtype (only for those matrices), what the layers compute with."""
    factors: dict[str, SVDFactors]
    errors: dict[str, float]
    cache_hits: int = 0
    held_errors: dict[str, float] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    def report(self) -> str:
        worst = max(self.errors.items(), key=lambda kv: kv[1])
        text = (f"{len(self.factors)} matrices decomposed ({self.cache_hits} from cache); "
                f"max relative reconstruction error {worst[1]:.2e} ({worst[0]})")
        if self.held_errors:
            name, err = max(self.held_errors.items(), key=lambda kv: kv[1])
            text += (f"; {err:.2e} ({name}) with U and Vh as held in "
                     f"{str(self.factors[name].U.dtype).removeprefix('torch.')}")
        return text


def decompose_weights(weights: dict[str, torch.Tensor], cache_dir=None, progress: bool = True,
                      like_weights: bool = False) -> Decomposition:
    """SVD of each weight [out, in] (keyed by its target name); ``cache_dir=False`` disables
    the disk cache.

    With ``like_weights``, U and Vh are cast to each weight's dtype as soon as it is decomposed
    (S stays float32; ``errors`` are measured before the cast, ``held_errors`` after it), so
    the float32 factors of all the matrices never exist at once: a bf16 model's factors then
    take their bf16 size (about 1.4x the adapted weights) plus one matrix's float32 factors,
    instead of twice that.
    """
    absent = [n for n, w in weights.items() if w.device.type == "meta"]
    if absent:
        raise ValueError(f"{len(absent)} target weights hold no values (on the meta device: "
                         f"offloaded, e.g. by accelerate's device_map, or never loaded): "
                         f"{absent[:3]}{' ...' if len(absent) > 3 else ''}; load the model "
                         f"onto real devices before patching it")
    cache = None if cache_dir is False else SVDCache(cache_dir)
    factors, errors, held, hits = {}, {}, {}, 0
    # disable=None: a bar on a terminal only, never escape codes in logs and pipes
    for name, w in tqdm(weights.items(), desc="SVD", disable=None if progress else True,
                        leave=False):
        if cache is None:
            f, hit = decompose_weight(w, name), False
        else:
            f, hit = cache.get_or_compute(w, name)
        errors[name] = relative_error(w, f)
        if like_weights and w.dtype != f.U.dtype:
            f = SVDFactors(f.U.to(w.dtype), f.S, f.Vh.to(w.dtype))
            held[name] = relative_error(w, f)
        factors[name] = f
        hits += int(hit)
    return Decomposition(factors, errors, hits, held)


def decompose_model(model: nn.Module, targets="all", layers=None, cache_dir=None,
                    progress: bool = True, like_weights: bool = False) -> Decomposition:
    """Decompose the target matrices of ``model`` (see :func:`t2fast.targets.resolve_targets`;
    ``like_weights`` as in :func:`decompose_weights`)."""
    names = resolve_targets(model, targets, layers)
    return decompose_weights(target_weights(model, names), cache_dir=cache_dir,
                             progress=progress, like_weights=like_weights)
