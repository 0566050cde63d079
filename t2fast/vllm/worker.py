"""Worker-side RPC methods (vLLM ``worker_extension_cls``), reached with ``collective_rpc``.

``t2fast.vllm.LLM`` sets ``worker_extension_cls="t2fast.vllm.worker.T2WorkerExtension"``; with
``vllm serve`` pass ``--worker-extension-cls t2fast.vllm.worker.T2WorkerExtension``. Every
worker (each tensor-parallel rank) runs the same call, so all banks stay identical.
"""
from __future__ import annotations

from .runner import RUNTIME_ATTR


class T2WorkerExtension:
    """Methods added to vLLM's worker class."""

    def _t2_runtime(self):
        model = self.model_runner.get_model()
        rt = getattr(model, RUNTIME_ATTR, None)
        if rt is None:
            raise RuntimeError("t2fast: this engine's model is not a t2fast model (select a "
                               "T2Fast* architecture through hf_overrides)")
        return rt

    # An exception escaping a collective_rpc method is fatal to vLLM's engine, so these
    # methods report errors in their result; t2fast.vllm.LLM raises them in the caller.
    def t2_load_experts(self, experts, allow_other_model=None) -> dict:
        """Load experts (file paths or ``{"name", "z", ...}`` dicts, z as float32 bytes);
        all-or-nothing. Returns ``{"names": bank order}`` or ``{"error": message}``."""
        return _guard(lambda: {"names": self._t2_runtime().load_experts(
            [decode_expert(e) for e in experts], allow_other_model)})

    def t2_unload_experts(self, names) -> dict:
        return _guard(lambda: {"names": self._t2_runtime().unload_experts(list(names))})

    def t2_info(self) -> dict:
        return _guard(lambda: self._t2_runtime().info())


def worker_error(results) -> str | None:
    """The first ``{"error": message}`` among every worker's answer to one call, or None."""
    return next((r["error"] for r in results if isinstance(r, dict) and "error" in r), None)


def check_bank_order(results, names) -> None:
    """Raise unless every worker's ``{"names": bank order}`` equals the front end's ``names``."""
    for r in results:
        if list(r["names"]) != list(names):
            raise RuntimeError(f"t2fast: worker bank order {list(r['names'])} differs from the "
                               f"front end's {list(names)}")


def _guard(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - see the comment above
        return {"error": f"{type(exc).__name__}: {exc}"}


def encode_expert(expert) -> dict:
    """An :class:`t2fast.experts.Expert` as plain data for vLLM's RPC serializer."""
    return {"name": expert.name, "base_model": expert.base_model,
            "fingerprint": expert.fingerprint.to_json() if expert.fingerprint else None,
            "z": {n: [list(v.shape), v.detach().float().cpu().contiguous().numpy().tobytes()]
                  for n, v in expert.z.items()}}


def decode_expert(e):
    """Inverse of :func:`encode_expert`; file paths pass through."""
    if not isinstance(e, dict):
        return e
    import numpy as np
    import torch

    from ..experts import Expert, Fingerprint

    z = {}
    for n, (shape, data) in e["z"].items():
        z[n] = torch.from_numpy(np.frombuffer(bytes(data), dtype=np.float32).copy()).reshape(
            shape)
    fp = e.get("fingerprint")
    return Expert(name=e["name"], z=z, base_model=e.get("base_model") or "",
                  fingerprint=Fingerprint(fp["shapes"], fp["sigma_sums"]) if fp else None)
