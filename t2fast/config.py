"""The settings of t2fast's SVF layers: one object for the library, the vLLM plugin, the trainer
and the command line.

:class:`SVFConfig` says which matrices are adapted, how the SVF layers run and which mixtures
they accept. :func:`t2fast.patch_model` takes one (``config=``, or its fields as keyword
arguments), :class:`t2fast.vllm.T2Config` extends it with the engine's expert bank,
:class:`t2fast.train.TrainConfig` builds one from its ``targets`` / ``layers`` / ``backend`` /
``cache_dir``, and the command line's flags are checked against its fields.

Its JSON form (:meth:`SVFConfig.to_dict`) holds only JSON values and reads back equal
(:meth:`SVFConfig.from_dict`); a layer range ``(start, stop)`` is written
``{"start": a, "stop": b}`` (a list always means explicit layers, see
:func:`t2fast.targets.normalize_layers`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .kernels.plans import BACKEND_CHOICES
from .mixtures import DEFAULT_BOUNDS, MixtureBounds
from .targets import layers_to_json, normalize_layers, normalize_targets

#: SVF kernel backends: ``"auto"`` (what the kernel plan names on CUDA, Triton under
#: ``TRITON_INTERPRET=1``, else torch), then the ones a kernel plan may name (``"triton"``,
#: ``"torch"``).
BACKENDS = ("auto", *BACKEND_CHOICES)


class SVFConfigError(ValueError):
    """A setting is invalid; ``field`` names it and ``why`` says what was expected."""

    def __init__(self, message: str, field: str, why: str):
        super().__init__(message)
        self.field, self.why = field, why


def _flag(value) -> bool:
    return isinstance(value, bool)


@dataclass
class SVFConfig:
    """How t2fast adapts a model.

    Attributes:
        targets: the matrices to adapt: ``"all"``, ``"attention"``, ``"mlp"``, a short name
            (``"down_proj"``) or a list of short names / globs over Hugging Face names
            (:func:`t2fast.targets.resolve_targets`).
        layers: the decoder layers: ``None`` (all), an int, ``(start, stop)``, a list of ints,
            ``"first_half"`` or ``"second_half"`` (:func:`t2fast.targets.normalize_layers`).
        backend: SVF kernel backend, one of :data:`BACKENDS`.
        hybrid: serve a batch whose rows all use one mixture with dense weights (the original
            ones for the base model, a cached merge otherwise), in eager and compiled calls; a
            CUDA graph captures the factored path, which follows every later mixture.
        cache_dir: SVD cache folder (``None``: :func:`t2fast.decompose.default_cache_dir`,
            ``$T2FAST_CACHE/svd``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``); ``False``
            disables it.
        allow_other_model: accept experts made for another base model of equal shapes.
        max_alpha_abs, max_alpha_l1: bounds on every mixture, ``|α_k| ≤ max_alpha_abs`` and
            ``Σ|α_k| ≤ max_alpha_l1`` (:class:`t2fast.mixtures.MixtureBounds`).
        mix_in_kernel: mix each row's z from α inside the kernel instead of a per-slot z table.
        max_experts: capacity of the expert bank (experts loaded at once; at least the number
            of experts given at patch or start-up time). Fixed for the life of the model, so
            captured or compiled steps never see the bank change shape.
        merge_cache_bytes: the byte budget of the merged weights cached for single-mixture
            batches (:class:`t2fast.runtime.MergeCache`); ``None`` (the default) takes half the
            device's free memory when the first merge is needed, ``0`` never merges.
        keep_dense: keep the original dense weights (see :func:`t2fast.patch_model`).
        deterministic: batch-invariant kernel plans (the default): a row's output is
            bit-identical whatever the other rows of its batch and whatever the token count.
            ``False`` opts in to the order-dependent plans, passed to :mod:`t2fast.ops` as its
            ``deterministic`` keyword: split-K shrinks with fp32 atomics at decode and, with
            ``backend="auto"``, the shipped table's backend per token bucket (the composition
            where it measured faster, mostly prefill); faster where the table says so, but a
            row's last bits then depend on its batch.
    """
    targets: str | list[str] = "all"
    layers: None | int | tuple[int, int] | list[int] | str = None
    backend: str = "auto"
    hybrid: bool = True
    cache_dir: str | bool | None = None
    allow_other_model: bool = False
    max_alpha_abs: float = DEFAULT_BOUNDS.max_abs
    max_alpha_l1: float = DEFAULT_BOUNDS.max_l1
    mix_in_kernel: bool = False
    keep_dense: bool = True
    deterministic: bool = True
    max_experts: int = 8
    merge_cache_bytes: int | None = None

    def __post_init__(self):
        self._check("targets", normalize_targets)
        self._check("layers", normalize_layers)
        if self.backend not in BACKENDS:
            self._bad("backend", f"backend must be one of {BACKENDS}")
        for name in ("hybrid", "allow_other_model", "mix_in_kernel", "keep_dense",
                     "deterministic"):
            if not _flag(getattr(self, name)):
                self._bad(name, "expected True or False")
        if isinstance(self.max_experts, bool) or not isinstance(self.max_experts, int) or \
                self.max_experts < 1:
            self._bad("max_experts", "max_experts must be a positive int")
        if self.merge_cache_bytes is not None and (
                isinstance(self.merge_cache_bytes, bool) or
                not isinstance(self.merge_cache_bytes, int) or self.merge_cache_bytes < 0):
            self._bad("merge_cache_bytes", "expected None (half the free device memory) or an "
                                           "int >= 0 (bytes; 0 never merges)")
        if isinstance(self.cache_dir, (str, os.PathLike)):
            self.cache_dir = str(self.cache_dir)
        elif self.cache_dir is not None and self.cache_dir is not False:
            self._bad("cache_dir", "expected a folder, None (the default cache) or False (none)")
        try:
            self.mixture_bounds
        except ValueError as exc:
            self._bad("max_alpha_abs", f"max_alpha_abs / max_alpha_l1: {exc}")

    def _check(self, name: str, normalize) -> None:
        try:
            setattr(self, name, normalize(getattr(self, name), name))
        except ValueError as exc:
            self._bad(name, getattr(exc, "why", str(exc)))

    def _bad(self, name: str, why: str):
        raise SVFConfigError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}",
                             name, why)

    @property
    def mixture_bounds(self) -> MixtureBounds:
        """The :class:`t2fast.mixtures.MixtureBounds` of ``max_alpha_abs`` / ``max_alpha_l1``."""
        return MixtureBounds(self.max_alpha_abs, self.max_alpha_l1)

    def svd_cache_dir(self) -> Path | bool | None:
        """``cache_dir`` as :class:`t2fast.decompose.SVDCache` takes it."""
        return Path(self.cache_dir) if isinstance(self.cache_dir, str) else self.cache_dir

    def to_dict(self) -> dict:
        """The JSON form: every field, JSON values only (``layers`` by :func:`layers_to_json`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layers"] = layers_to_json(self.layers)
        return d

    @classmethod
    def from_dict(cls, d):
        """The settings of a JSON form (a dict, a JSON string, ``None`` for the defaults, or an
        instance, returned as is); unknown keys are an error that lists the known ones."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} settings must be a dict, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def build(cls, config=None, mixture_bounds: MixtureBounds | None = None, **settings):
        """``config`` (default ``cls()``) with ``settings`` replacing its fields, as the keyword
        arguments of :func:`t2fast.patch_model` and :func:`t2fast.vllm.engine_args` do.

        ``targets=None`` / ``layers=None`` mean "not given" (keep ``config``'s);
        ``mixture_bounds`` (a :class:`t2fast.mixtures.MixtureBounds`) sets ``max_alpha_abs`` and
        ``max_alpha_l1``. An unknown setting is a ``TypeError`` that lists the known ones.
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a t2fast {cls.__name__} or None, got "
                            f"{type(config).__name__}")
        if mixture_bounds is not None:
            if not isinstance(mixture_bounds, MixtureBounds):
                raise TypeError(f"mixture_bounds must be a t2fast.mixtures.MixtureBounds or "
                                f"None, got {type(mixture_bounds).__name__}")
            settings.update(max_alpha_abs=mixture_bounds.max_abs,
                            max_alpha_l1=mixture_bounds.max_l1)
        for name in ("targets", "layers"):
            if settings.get(name, 0) is None:
                del settings[name]
        return (config or cls()).replace(**settings)

    def replace(self, **changes):
        """A copy with ``changes`` (field names; checked as at construction)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no settings {unknown}; known: "
                            f"{sorted(known)}")
        return dataclasses.replace(self, **changes)
