"""t2fast's settings for a vLLM engine, and how they travel to every process.

Opting in takes two things, both plain vLLM arguments:

* the architecture: ``hf_overrides={"architectures": ["T2FastLlamaForCausalLM"]}`` (or the
  Mistral / Qwen2 variant), which makes vLLM build t2fast's model class, and
* the settings: ``additional_config={"t2fast": {...}}`` (or, equivalently, a ``"t2fast"`` key in
  ``hf_overrides``), which vLLM ships to the front end, the engine core and every worker.

:class:`T2Config` is that ``{...}``: JSON only, since vLLM hashes ``additional_config``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..config import SVFConfig

CONFIG_KEY = "t2fast"

#: HF architecture -> t2fast's architecture (the vLLM model class that swaps in SVF layers).
ARCHITECTURES = {
    "LlamaForCausalLM": "T2FastLlamaForCausalLM",
    "MistralForCausalLM": "T2FastMistralForCausalLM",
    "Qwen2ForCausalLM": "T2FastQwen2ForCausalLM",
}
T2_ARCHITECTURES = frozenset(ARCHITECTURES.values())


@dataclass
class T2Config(SVFConfig):
    """Settings of t2fast's SVF layers inside a vLLM engine: a
    :class:`t2fast.config.SVFConfig` (targets, layers, backend, hybrid, cache_dir,
    allow_other_model, max_alpha_abs, max_alpha_l1, deterministic, max_experts,
    merge_cache_bytes) and the experts loaded at start-up.

    Attributes:
        experts: expert files loaded at start-up (list of paths, bank order).
        hybrid: in eager mode, serve a step whose requests all use one mixture with dense
            weights (the original ones for the base model, a cached merge otherwise). Off by
            default: dense and factored results differ in rounding, so with it a request's
            greedy answer may depend on which other requests share its step.
        mix_in_kernel, keep_dense: always True here (the vLLM layers mix z from α inside the
            kernel and keep the dense weights); ``False`` applies to ``patch_model`` only.
    """
    hybrid: bool = False
    mix_in_kernel: bool = True
    experts: list = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.experts, (str, os.PathLike)):
            self.experts = [self.experts]
        self.experts = [str(p) for p in self.experts]
        if len(self.experts) > self.max_experts:
            self._bad("experts", f"{len(self.experts)} expert files given but max_experts is "
                                 f"{self.max_experts}; raise max_experts")
        for name in ("mix_in_kernel", "keep_dense"):
            if not getattr(self, name):
                self._bad(name, "the vLLM layers always mix in the kernel and keep the dense "
                                "weights; False applies to t2fast.patch_model only")


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
