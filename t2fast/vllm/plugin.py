"""vLLM general plugin (entry point ``vllm.general_plugins: t2fast``).

vLLM calls :func:`register` in every process (front end, engine core, workers) before a model is
built. It only *adds* things, and they act only when an engine opts in by selecting a t2fast
architecture (``T2FastLlamaForCausalLM`` ...):

* registers the t2fast model classes with vLLM's ``ModelRegistry`` (lazily, by module path);
* wraps ``InputProcessor.process_inputs`` so that, for t2fast engines only, each request's
  ``extra_args["t2"]`` is validated and normalized at the front end and its prefix-cache key is
  salted per mixture (other engines call straight through).

The runner hooks are installed later, by the t2fast model class itself, in the worker that
builds it. Calling :func:`register` again does nothing.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("t2fast.vllm")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry

    from .config import ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"t2fast.vllm.models:{arch}")
    try:
        from .frontend import install_input_processor_hook

        install_input_processor_hook()
    except Exception as exc:  # noqa: BLE001 - never break plain vLLM because of t2fast
        logger.warning("t2fast: front-end request validation is unavailable (%s); requests "
                       "naming a mixture will be served with the base model (workers place "
                       "only mixtures the front end checked)",
                       exc)
