"""SVF experts: one z vector per adapted matrix, and their files.

Expert file (safetensors): one float32 tensor [r] per adapted matrix (read also from float16,
bfloat16 and exactly-float32 float64: :data:`Z_DTYPES`), keyed by its Hugging Face
module name (``model.layers.0.mlp.down_proj``), and metadata::

    format           "t2fast-expert"
    format_version   "1"
    name             the expert's name
    base_model       name of the base model it was trained on
    fingerprint_json {"shapes": sha256 of (name, shape) of every target,
                      "sigma_sums": {target: Σσ}}  — identifies the base weights
    targets_json     [target names, model order]
    shapes_json      {target: [r]} (the length of each z)
    extra_json       free-form (training config, scores ...)

An expert **folder** (:meth:`Expert.save_pretrained`, PEFT-style) holds that file as
``expert.safetensors`` beside ``expert_config.json`` (format, format_version, name, base_model,
targets, ranks); :func:`load_expert` reads either. Names follow
:func:`t2fast.mixtures.check_expert_name`; every z is finite with ``|z| ≤ 8``
(:func:`t2fast.mixtures.check_z`).

The bank that holds loaded experts, and the mixtures over it, are the runtime's
(:class:`t2fast.runtime.ExpertBank`, :mod:`t2fast.mixtures`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decompose import SVDFactors
from .messages import shown
from .mixtures import MixtureError, check_expert_name, check_z, is_finite_real
from .safetensors_io import T2FileError, read_file, read_header, read_json, write_file

EXPERT_FORMAT = "t2fast-expert"
EXPERT_VERSION = "1"
SIGMA_RTOL = 1e-3
#: dtypes a file may store z in. z is float32 in memory and written as float32; float16 and
#: bfloat16 are read exactly (every value is a float32 value); float64 is read only when every
#: value is a float32 value (a float32 z saved as float64), else refused: never rounded.
Z_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: the most tensor data an expert file may hold when it is read without a model to check it
#: against (a 405B model's z vectors take about 60 MB in float32); with one, its exact size.
MAX_EXPERT_BYTES = 256 << 20


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
    """A named set of z vectors, one float32 [r] per target matrix.

    ``name`` must be a valid expert name (:func:`t2fast.mixtures.check_expert_name`); every z is
    checked (finite, ``|z| ≤ Z_MAX``) when the expert is saved, loaded or added to a bank.
    """
    name: str
    z: dict[str, torch.Tensor]
    base_model: str = ""
    fingerprint: Fingerprint | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_expert_name(self.name, "Expert.name")

    @property
    def targets(self) -> list[str]:
        return list(self.z)

    @classmethod
    def ones(cls, name: str, factors: dict[str, SVDFactors], base_model: str = "") -> "Expert":
        """The identity expert (z = 1 everywhere) for ``factors``."""
        return cls(name, {n: torch.ones(f.rank, dtype=torch.float32) for n, f in factors.items()},
                   base_model, Fingerprint.of(factors))

    @classmethod
    def random(cls, name: str, factors: dict[str, SVDFactors], scale: float = 0.1,
               seed: int = 0, base_model: str = "") -> "Expert":
        """z = 1 + scale·N(0, 1), a stand-in expert for demos and tests."""
        g = torch.Generator().manual_seed(seed)
        z = {n: 1 + scale * torch.randn(f.rank, generator=g, dtype=torch.float32)
             for n, f in factors.items()}
        return cls(name, z, base_model, Fingerprint.of(factors))

    def save(self, path) -> Path:
        """Write the expert as a safetensors file (see the module docstring)."""
        for n, v in self.z.items():
            check_z(n, v, where=f"expert {self.name!r}")
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

    def save_pretrained(self, folder) -> Path:
        """Write a PEFT-style folder: ``expert.safetensors`` (the single-file format) and
        ``expert_config.json`` (format, version, name, base model, targets with z lengths).
        :func:`load_expert` reads the folder."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{str(folder)!r} exists and is not a folder")
        self.save(folder / EXPERT_WEIGHTS)
        cfg = {"format": EXPERT_FORMAT, "format_version": EXPERT_VERSION, "name": self.name,
               "base_model": self.base_model, "targets": self.targets,
               "ranks": {n: int(v.shape[0]) for n, v in self.z.items()}}
        (folder / EXPERT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return folder

    def check_against(self, factors: dict[str, SVDFactors], fingerprint: Fingerprint | None = None,
                      allow_other_model: bool = False, where: str = "") -> None:
        """Raise :class:`T2FileError` unless this expert fits the decomposition ``factors``.

        Targets must be the same set and each z must have length rank(W). Unless
        ``allow_other_model`` (cross-model transfer between models of equal shapes), the base
        model's fingerprint must match too.
        """
        where = where or f"expert {self.name!r}"
        for n, v in self.z.items():
            check_z(n, v, where=where)
        check_fit({n: tuple(v.shape) for n, v in self.z.items()}, factors, where)
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
                              f"allow_other_model=True (command line: --allow-other-model) "
                              f"for cross-model transfer")


def check_fit(shapes: dict[str, tuple], factors: dict[str, SVDFactors], where: str) -> None:
    """Raise :class:`T2FileError` unless the z shapes ``{target: shape}`` are exactly one
    ``(rank,)`` per matrix of ``factors`` (``where`` names the expert or file)."""
    missing = [n for n in factors if n not in shapes]
    extra = [n for n in shapes if n not in factors]
    if missing or extra:
        raise T2FileError(
            f"{where} does not cover the adapted matrices: "
            + (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"{len(extra)} not adapted here (e.g. {[n[:80] for n in extra[:3]]})"
               if extra else ""))
    for n, f in factors.items():
        if tuple(shapes[n]) != (f.rank,):
            raise T2FileError(f"{where}: z for {n} has shape {tuple(shapes[n])}, but that "
                              f"matrix has rank {f.rank} (shape {f.shape})")


def _meta(meta: dict, key: str, kind, expected: str, where: str, default=None):
    """Metadata field ``key`` of the expected type, or a T2FileError naming file and field."""
    v = meta.get(key, default)
    if v is not None and not isinstance(v, kind):
        raise T2FileError(f"{where}: metadata field {key!r} must be {expected}, got "
                          f"{type(v).__name__} {str(v)[:80]!r}")
    return v


def _fingerprint(fp, where: str) -> Fingerprint | None:
    if fp is None:
        return None
    bad = (not isinstance(fp, dict) or not isinstance(fp.get("shapes"), str) or
           not isinstance(fp.get("sigma_sums"), dict) or
           not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and is_finite_real(v) for k, v in fp["sigma_sums"].items()))
    if bad:
        raise T2FileError(f"{where}: metadata field 'fingerprint' must be {{'shapes': str, "
                          f"'sigma_sums': {{target: number}}}}, got {str(fp)[:80]!r}")
    return Fingerprint(fp["shapes"], {k: float(v) for k, v in fp["sigma_sums"].items()})


EXPERT_CONFIG = "expert_config.json"
EXPERT_WEIGHTS = "expert.safetensors"


def load_expert(path, factors: dict[str, SVDFactors] | None = None,
                allow_other_model: bool = False) -> Expert:
    """Read an expert file or folder; with ``factors``, check it fits that decomposition.

    ``path`` is a single ``.safetensors`` file or a folder written by
    :meth:`Expert.save_pretrained` (``expert_config.json`` + ``expert.safetensors``). The
    header (tensor names, dtypes, shapes, metadata) is checked first — against ``factors`` when
    given, else against ``MAX_EXPERT_BYTES`` — and only then is the tensor data read. z comes
    back float32 (:data:`Z_DTYPES` says how other dtypes are read).
    Raises :class:`t2fast.safetensors_io.T2FileError` (a ``ValueError``) naming the file and the
    problem: missing, unreadable or truncated file, wrong format, duplicate or mistyped
    metadata, invalid name, z of another dtype, NaN/Inf or out-of-range z, missing or extra
    matrices, wrong lengths, another base model.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, factors, allow_other_model)
    where = f"expert file {str(path)!r}"

    def check_header(infos, meta):
        for n, info in infos.items():
            if len(info.shape) != 1:
                raise T2FileError(f"{where}: z for {n[:80]} must be 1-D, the header declares "
                                  f"shape {list(info.shape)[:8]}")
        if factors is not None:
            check_fit({n: info.shape for n, info in infos.items()}, factors, where)

    tensors, meta = read_file(path, "expert", EXPERT_FORMAT, (EXPERT_VERSION,),
                              dtypes=Z_DTYPES, max_bytes=MAX_EXPERT_BYTES, check=check_header)
    listed = _meta(meta, "targets", list, "a list of target names", where)
    if listed is not None and (not all(isinstance(n, str) for n in listed) or
                               sorted(listed) != sorted(tensors)):
        raise T2FileError(f"{where}: metadata lists {len(listed)} targets but the file holds "
                          f"{len(tensors)} tensors named otherwise")
    for n, v in tensors.items():
        check_z(n, v, where=where)
    name = _meta(meta, "name", str, "a string", where) or path.stem
    try:
        check_expert_name(name, f"{where}: expert name")
    except MixtureError as exc:
        raise T2FileError(str(exc)) from None
    expert = Expert(
        name=name,
        z={n: _z_float32(n, tensors[n], where) for n in (listed or list(tensors))},
        base_model=_meta(meta, "base_model", str, "a string", where, ""),
        fingerprint=_fingerprint(meta.get("fingerprint"), where),
        extra=_meta(meta, "extra", dict, "a JSON object", where) or {},
    )
    if factors is not None:
        expert.check_against(factors, allow_other_model=allow_other_model, where=where)
    return expert


def _z_float32(name: str, z: torch.Tensor, where: str) -> torch.Tensor:
    """z of a file as float32, by the rules of :data:`Z_DTYPES` (exact or refused)."""
    if z.dtype == torch.float64:
        z32 = z.float()
        inexact = (z32.double() != z).nonzero()
        if inexact.numel():
            i = int(inexact[0])
            raise T2FileError(f"{where}: z for {name} is float64 and z[{i}] = {float(z[i])!r} "
                              f"is not a float32 value; t2fast reads z as float32 and does not "
                              f"round it: store z as float32")
        return z32
    return z.float()


def expert_targets(path) -> list[str]:
    """The matrices an expert file or folder adapts (its tensor names, in the order its
    metadata lists them), read from the file's header alone."""
    path = Path(path)
    weights = path / EXPERT_WEIGHTS if path.is_dir() else path
    infos, meta = read_header(weights, "expert", EXPERT_FORMAT, (EXPERT_VERSION,))
    listed = meta.get("targets")
    if isinstance(listed, list) and sorted(map(str, listed)) == sorted(infos):
        return [str(n) for n in listed]
    return list(infos)


def _load_folder(folder: Path, factors, allow_other_model: bool) -> Expert:
    cfg_path, weights = folder / EXPERT_CONFIG, folder / EXPERT_WEIGHTS
    where = f"expert folder {str(folder)!r}"
    if not cfg_path.is_file() or not weights.is_file():
        lora = (folder / "adapter_config.json").is_file()
        raise T2FileError(f"{where} is not a t2fast expert folder: it needs {EXPERT_CONFIG} and "
                          f"{EXPERT_WEIGHTS} (written by Expert.save_pretrained)"
                          + ("; it is a PEFT LoRA adapter folder (use --lora / PEFT)"
                             if lora else ""))
    cfg = read_json(cfg_path, f"{where}: {EXPERT_CONFIG}")
    if not isinstance(cfg, dict) or cfg.get("format") != EXPERT_FORMAT:
        raise T2FileError(f"{where}: {EXPERT_CONFIG} does not declare format "
                          f"{EXPERT_FORMAT!r}")
    if cfg.get("format_version") != EXPERT_VERSION:
        raise T2FileError(f"{where}: {EXPERT_CONFIG} has format_version "
                          f"{shown(cfg.get('format_version'))}; this t2fast reads "
                          f"{EXPERT_VERSION!r}")
    expert = load_expert(weights, factors, allow_other_model)
    for key, have in (("name", expert.name), ("targets", expert.targets)):
        if cfg.get(key) != have:
            raise T2FileError(f"{where}: {EXPERT_CONFIG} says {key} = {shown(cfg.get(key))} "
                              f"but {EXPERT_WEIGHTS} holds {shown(have)}")
    return expert


def check_unique_names(names: list[str]) -> None:
    """Raise ``ValueError`` naming the duplicates when ``names`` repeats a name."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"expert names must be unique; {dup} appear more than once in {names}")
