"""t2fast's vLLM model classes: vLLM's own Llama / Mistral / Qwen2 with SVF projections.

Registered (lazily, by name) by :func:`t2fast.vllm.plugin.register`; selected with
``hf_overrides={"architectures": ["T2FastLlamaForCausalLM"]}`` (or the Mistral / Qwen2 name).
Each class builds vLLM's model, then swaps its projections' quant methods for SVF ones
(:func:`t2fast.vllm.layers.install_svf_methods`) before the weights load, so eager and compiled
execution both see the SVF layers.
"""
from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .config import config_from_vllm
from .environment import reports_startup_errors
from .layers import install_svf_methods
from .runner import RUNTIME_ATTR, T2Runtime, install_runner_hooks


def check_parallel(vllm_config) -> None:
    """Refuse, at start-up, what t2fast does not combine with: pipeline parallelism (not
    verified; tensor parallelism is supported, see :mod:`t2fast.vllm.layers`), vLLM's LoRA
    adapters (their deltas would bypass t2fast's layers and KV checks), and speculative
    decoding with adaptive draft verification (a step's per-request token counts are then not
    on the host, which every per-request mixture needs: refused in the first such step, it
    failed every request in flight)."""
    pp = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise NotImplementedError(
            f"t2fast: pipeline_parallel_size={pp} is not supported; use tensor parallelism "
            f"(tensor_parallel_size) to split the model")
    if getattr(vllm_config, "lora_config", None) is not None:
        raise NotImplementedError("t2fast: vLLM's LoRA adapters (--enable-lora) are not "
                                  "combined with t2fast's experts; serve one or the other")
    spec = getattr(vllm_config, "speculative_config", None)
    if getattr(spec, "enable_adaptive_verification", False):
        raise NotImplementedError("t2fast: speculative decoding with adaptive draft "
                                  "verification is not supported (per-request mixtures need "
                                  "each request's token count on the host); turn it off")


@reports_startup_errors
def install(model, vllm_config) -> T2Runtime:
    """Attach a :class:`T2Runtime` to a freshly built vLLM model and swap in the SVF quant
    methods."""
    cfg = config_from_vllm(vllm_config)
    check_parallel(vllm_config)
    runtime = T2Runtime(vllm_config, cfg)
    adapted = install_svf_methods(model, runtime, getattr(model, "packed_modules_mapping", None))
    runtime.expected_targets = adapted
    object.__setattr__(model, RUNTIME_ATTR, runtime)
    install_runner_hooks()
    return runtime


class T2FastLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        install(self, vllm_config)


class T2FastMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        install(self, vllm_config)


class T2FastQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        install(self, vllm_config)
