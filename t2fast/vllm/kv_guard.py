"""Keep the KV cache finite, whatever one request's mixture does to its own activations.

vLLM reuses freed KV blocks for other requests, and attention multiplies the stale, masked
positions of a block by a zero probability: ``0 · NaN = NaN`` and ``0 · Inf = NaN``. So one
request whose activations overflow (a huge α, a poisoned expert) would, through the blocks it
leaves behind, turn other requests' answers into garbage. The front end bounds α and z
(:mod:`t2fast.mixtures`), but the guarantee must not rest on the bounds alone: every projection
that writes keys and values (``qkv_proj``, or ``k_proj`` / ``v_proj``) passes its output
through :func:`finite_guard`, which is the identity on ordinary values, maps NaN to 0 and clamps
everything else to ``±finfo(dtype).max / 4`` (so rotary embeddings cannot overflow it again).
A request that overflows gets garbage for itself only; nobody else's cache sees a non-finite
number.
"""
from __future__ import annotations

import torch

try:
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
except Exception:  # noqa: BLE001 - vllm missing: the module stays importable for docs
    QuantizeMethodBase = object

#: HF matrices whose outputs are written to the KV cache.
KV_PARTS = ("k_proj", "v_proj")


def writes_kv(hf_names) -> bool:
    """True when a vLLM linear layer holding the HF matrices ``hf_names`` produces keys or
    values."""
    return any(n.rsplit(".", 1)[-1] in KV_PARTS for n in hf_names)


def finite_guard(y: torch.Tensor) -> torch.Tensor:
    """``y`` with NaN → 0 and values clamped to ``±finfo(y.dtype).max / 4`` (same shape and
    dtype; the identity on finite values inside that range, i.e. on every ordinary activation)."""
    lim = torch.finfo(y.dtype).max / 4
    return torch.nan_to_num(y.clamp(-lim, lim), nan=0.0)


class WrappedMethod(QuantizeMethodBase):
    """A quant method that wraps a linear layer's original one: it creates the same weights and
    answers whatever else vLLM asks of a method from the original."""

    def __init__(self, base):
        self.base = base
        for attr in ("requires_device_loading", "uses_meta_device",
                     "supports_pre_processed_weights"):   # attributes vLLM reads directly
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def __getattr__(self, name):  # anything else vLLM asks of the original method
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def create_weights(self, layer, *args, **kwargs):
        return self.base.create_weights(layer, *args, **kwargs)


class KVGuardMethod(WrappedMethod):
    """Wraps the original method of a KV-producing layer that has no SVF target, so that its
    output is guarded too (its input may come from an overflowed residual stream)."""

    def process_weights_after_loading(self, layer) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return finite_guard(self.base.apply(layer, x, bias))
