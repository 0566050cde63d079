"""t2fast for vLLM: SVF layers in vLLM's executor, an expert mixture per request.

    from vllm import SamplingParams
    from t2fast.vllm import LLM

    llm = LLM("path/to/llama", experts=["math.safetensors", "code.safetensors"])
    llm.generate(prompts, [SamplingParams(extra_args={"t2": {"expert": "math"}}), ...])

See ``docs/vllm.md``. Importing this package is cheap: vLLM is imported only when used.
"""
from __future__ import annotations

from ..mixtures import REQUEST_KEY
from .config import ARCHITECTURES, CONFIG_KEY, T2Config

__all__ = ["ARCHITECTURES", "CONFIG_KEY", "LLM", "REQUEST_KEY", "T2Config",
           "T2RequestError", "engine_args", "parse_request", "register"]


def __getattr__(name):
    if name in ("LLM", "engine_args"):
        from . import llm
        return getattr(llm, name)
    if name in ("T2RequestError", "parse_request"):
        from . import frontend
        return getattr(frontend, name)
    if name == "register":
        from .plugin import register
        return register
    raise AttributeError(f"module 't2fast.vllm' has no attribute {name!r}")
