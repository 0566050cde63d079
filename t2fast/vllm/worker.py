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

    def t2_load_experts(self, experts, allow_other_model=None) -> list[str]:
        """Load experts (file paths or ``{"name", "z", ...}`` dicts); returns the bank order."""
        return self._t2_runtime().load_experts(list(experts), allow_other_model)

    def t2_unload_experts(self, names) -> list[str]:
        return self._t2_runtime().unload_experts(names)

    def t2_info(self) -> dict:
        return self._t2_runtime().info()
