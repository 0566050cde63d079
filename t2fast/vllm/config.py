"""t2fast's settings for a vLLM engine, and how they travel to every process.

Opting in takes two things, both plain vLLM arguments:

* the architecture: ``hf_overrides={"architectures": ["T2FastLlamaForCausalLM"]}`` (or the
  Mistral / Qwen2 variant), which makes vLLM build t2fast's model class, and
* the settings: ``additional_config={"t2fast": {...}}`` (or, equivalently, a ``"t2fast"`` key in
  ``hf_overrides``), which vLLM ships to the front end, the engine core and every worker.

:class:`T2Config` is that ``{...}``: JSON only, since vLLM hashes ``additional_config``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..mixtures import MixtureBounds

CONFIG_KEY = "t2fast"
REQUEST_KEY = "t2"

#: HF architecture -> t2fast's architecture (the vLLM model class that swaps in SVF layers).
ARCHITECTURES = {
    "LlamaForCausalLM": "T2FastLlamaForCausalLM",
    "MistralForCausalLM": "T2FastMistralForCausalLM",
    "Qwen2ForCausalLM": "T2FastQwen2ForCausalLM",
}
T2_ARCHITECTURES = frozenset(ARCHITECTURES.values())
BACKENDS = ("auto", "triton", "torch")


@dataclass
class T2Config:
    """Settings of t2fast's SVF layers inside a vLLM engine.

    Attributes:
        experts: expert files loaded at start-up (list of paths, bank order).
        targets, layers: the matrices to adapt, as in :func:`t2fast.patch_model`
            (``"all"``, ``"attention"``, ``"mlp"``, short names or globs over Hugging Face names;
            ``layers`` None, an int, ``[start, stop]``, a list, ``"first_half"``...).
        max_experts: capacity of the expert bank (experts loaded at once). Fixed when the engine
            starts, so compiled graphs never see a shape change when experts come and go.
        backend: SVF kernel backend, ``"auto"`` (Triton on CUDA, else torch), ``"triton"``,
            ``"torch"``.
        hybrid: in eager mode, serve a step whose requests all use one mixture with dense
            weights (the original ones for the base model, a cached merge otherwise). Off by
            default: dense and factored results differ in rounding, so with it a request's
            greedy answer may depend on which other requests share its step.
        cache_dir: SVD cache folder (default: t2fast's cache); ``False`` disables it.
        allow_other_model: accept experts made for another base model of equal shapes.
        max_alpha_abs, max_alpha_l1: bounds on every request's mixture weights,
            ``|α_k| ≤ max_alpha_abs`` and ``Σ|α_k| ≤ max_alpha_l1``
            (:class:`t2fast.mixtures.MixtureBounds`).
    """
    experts: list = field(default_factory=list)
    targets: object = "all"
    layers: object = None
    max_experts: int = 8
    backend: str = "auto"
    hybrid: bool = False
    cache_dir: object = None
    allow_other_model: bool = False
    max_alpha_abs: float = 4.0
    max_alpha_l1: float = 8.0

    def __post_init__(self):
        if isinstance(self.experts, (str, os.PathLike)):
            self.experts = [self.experts]
        self.experts = [str(p) for p in self.experts]
        # JSON has no tuples: a list is a list of layer indices, {"start": a, "stop": b} a range.
        if isinstance(self.layers, dict):
            self.layers = list(range(int(self.layers["start"]), int(self.layers["stop"])))
        elif isinstance(self.layers, (tuple, range)):
            self.layers = list(range(*self.layers)) if isinstance(self.layers, tuple) \
                else list(self.layers)
        if not isinstance(self.max_experts, int) or self.max_experts < 1:
            raise ValueError(f"t2fast: max_experts must be a positive int, got "
                             f"{self.max_experts!r}")
        if len(self.experts) > self.max_experts:
            raise ValueError(f"t2fast: {len(self.experts)} expert files given but max_experts "
                             f"is {self.max_experts}; raise max_experts")
        if self.backend not in BACKENDS:
            raise ValueError(f"t2fast: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.cache_dir is not None and self.cache_dir is not False:
            self.cache_dir = str(self.cache_dir)
        try:
            MixtureBounds(self.max_alpha_abs, self.max_alpha_l1)
        except ValueError as exc:
            raise ValueError(f"t2fast: max_alpha_abs / max_alpha_l1: {exc}") from None

    @property
    def mixture_bounds(self) -> MixtureBounds:
        """The :class:`t2fast.mixtures.MixtureBounds` of ``max_alpha_abs`` / ``max_alpha_l1``."""
        return MixtureBounds(self.max_alpha_abs, self.max_alpha_l1)

    @classmethod
    def from_dict(cls, d) -> "T2Config":
        if d is None:
            return cls()
        if isinstance(d, T2Config):
            return d
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict):
            raise ValueError(f"t2fast settings must be a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"t2fast: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["layers"], (tuple, range)):
            d["layers"] = list(d["layers"])
        return d

    def layers_arg(self):
        """``layers`` in the form :func:`t2fast.targets.resolve_targets` takes."""
        if isinstance(self.layers, list):
            return [int(v) for v in self.layers]
        return self.layers

    def svd_cache_dir(self):
        return False if self.cache_dir is False else (
            Path(self.cache_dir) if self.cache_dir else None)


def is_t2_model_config(model_config) -> bool:
    """True when vLLM's ``model_config`` selects one of t2fast's architectures."""
    try:
        archs = model_config.architectures or []
    except Exception:  # noqa: BLE001 - a config without architectures is not ours
        return False
    return any(a in T2_ARCHITECTURES for a in archs)


def config_from_vllm(vllm_config) -> T2Config:
    """The :class:`T2Config` of an engine: ``additional_config["t2fast"]``, else a ``t2fast``
    attribute of the HF config (set through ``hf_overrides``), else the defaults."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if isinstance(extra, dict) and CONFIG_KEY in extra:
        return T2Config.from_dict(extra[CONFIG_KEY])
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    d = getattr(hf, CONFIG_KEY, None)
    return T2Config.from_dict(d)


def num_decoder_layers(model_config) -> int:
    hf = model_config.hf_text_config if hasattr(model_config, "hf_text_config") else \
        model_config.hf_config
    return int(getattr(hf, "num_hidden_layers"))
