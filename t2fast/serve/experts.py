"""The server's experts: what requests may name, run-time loading and unloading, in-flight use.

:class:`ServedExperts` keeps three things in step, the way vLLM's ``OpenAIServingModels`` does
for LoRA adapters: the engine front end's list of names (:class:`t2fast.vllm.frontend.FrontEnd`,
which validates every request's mixture), the banks of every worker (through
``engine_client.collective_rpc`` into :class:`t2fast.vllm.worker.T2WorkerExtension`), and the
count of in-flight requests per expert, so that an expert is never unloaded under a request that
uses it (its answer would silently change mid-generation).

Files named by clients (:meth:`ServedExperts.load_from_client`) must resolve, symlinks
included, inside the server's run-time loading root; one error text covers "outside the root"
and "missing", and no response carries a server path (cards name the expert, not its file).
Files are read off the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from http import HTTPStatus
from pathlib import Path

from ..mixtures import Mixture, MixtureError, check_expert_name
from ..messages import shown
from .translate import T2HTTPError

#: How long an unload waits for the requests that use the expert to finish.
DRAIN_TIMEOUT_S = 60.0


class ServedExperts:
    """Experts of one t2fast server.

    Args:
        engine_client: vLLM's ``EngineClient`` (``AsyncLLM``).
        frontend: the engine's :class:`t2fast.vllm.frontend.FrontEnd`.
        base_names: the served names of the base model (an expert may not take one).
        paths: ``{name: file}`` of the experts loaded at start-up.
        root: the folder client-named files must resolve inside (None: clients may not name
            files).
    """

    def __init__(self, engine_client, frontend, base_names, paths: dict | None = None,
                 root=None):
        self.engine_client = engine_client
        self.frontend = frontend
        self.base_names = list(base_names)
        self.paths: dict[str, str] = dict(paths or {})   # for the server's log only
        self.root = None if root is None else Path(root).resolve()
        self.in_flight: Counter = Counter()
        self.swapping: dict[str, asyncio.Event] = {}   # name -> set when its replace is done
        self.lock = asyncio.Lock()
        self.drained = asyncio.Condition()

    @property
    def names(self) -> list[str]:
        """Loaded experts, in bank order (the order of α lists)."""
        return list(self.frontend.names)

    def parse(self, raw) -> Mixture:
        """The :class:`~t2fast.mixtures.Mixture` of a raw spec (raises ``T2RequestError``, a
        ``ValueError``)."""
        return self.frontend.parse(raw)

    # ---- in-flight requests -------------------------------------------------------------
    async def acquire(self, mixture: Mixture) -> list[str]:
        """Count a request that uses the experts of ``mixture`` (after waiting for a
        replacement of one of them to finish)."""
        return await self._count(list(mixture.names))

    async def _count(self, used: list[str]) -> list[str]:
        while any(n in self.swapping for n in used):
            await next(self.swapping[n] for n in used if n in self.swapping).wait()
        self.in_flight.update(used)
        return used

    @contextlib.asynccontextmanager
    async def using(self, names: list[str]):
        """Count pass 1's internal request on ``names`` (the classification expert) like a
        client's request, so that an unload or a replacement waits for it to finish."""
        used = await self._count(list(names))
        try:
            yield
        finally:
            await self.release(used)

    async def release(self, used: list[str]) -> None:
        if not used:
            return
        self.in_flight.subtract(used)
        async with self.drained:
            self.drained.notify_all()

    # ---- loading ------------------------------------------------------------------------
    def check_name(self, name) -> str:
        try:
            check_expert_name(name, "expert name")
        except MixtureError as exc:
            raise T2HTTPError(str(exc), param="name") from None
        if name in self.base_names:
            raise T2HTTPError(f"expert name {name!r} is the base model's served name",
                              param="name")
        return name

    def client_path(self, path) -> Path:
        """The expert file or folder a client's ``path`` names (relative to the root, or
        absolute), resolved with its symlinks; it must exist inside the root.

        Raises:
            T2HTTPError (400) with one text for "outside the root" and "missing".
        """
        if not isinstance(path, str) or not path:
            raise T2HTTPError("'path' must be the path of an expert file, relative to the "
                              "server's run-time loading root", param="path")
        refused = T2HTTPError(f"'path' {shown(path)} names no expert file or folder inside "
                              f"the server's run-time loading root", param="path")
        if self.root is None or "\0" in path:
            raise refused
        try:
            resolved = (self.root / path).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, unreadable
            raise refused from None
        if not resolved.is_relative_to(self.root):
            raise refused
        return resolved

    async def load_from_client(self, name, path, replace: bool = False) -> dict:
        """:meth:`load` of a file a client named (``POST /v1/t2/experts``): confined to the
        root, and its errors quote the client's ``path``, never the server's."""
        self.check_name(name)
        resolved = await asyncio.to_thread(self.client_path, path)
        try:
            return await self.load(name, str(resolved), replace)
        except T2HTTPError as exc:
            if exc.param != "path":
                raise
            raise T2HTTPError(exc.message.replace(str(resolved), path), param="path") from None

    async def load(self, name: str, path: str, replace: bool = False) -> dict:
        """Load the expert file ``path`` as ``name`` into every worker (all or nothing); the
        file is read in a thread, off the event loop.

        Raises:
            T2HTTPError: 400 for a bad name or file, 409 when ``name`` is loaded and not
                ``replace``, or when the bank is full.
        """
        from ..experts import Expert, load_expert
        from ..vllm.frontend import expert_digest
        from ..vllm.worker import encode_expert

        self.check_name(name)
        if not isinstance(path, str) or not path:
            raise T2HTTPError("'path' must be the path of an expert file", param="path")
        async with self.lock:
            try:
                self.frontend.check_load([name], replace, hint='pass "replace": true')
            except ValueError as exc:
                raise T2HTTPError(f"{exc} (--max-experts)" if name not in self.frontend.names
                                  else str(exc), param="name",
                                  status=HTTPStatus.CONFLICT) from None
            try:  # readable, finite, z in range: refuse here rather than in the workers
                e = await asyncio.to_thread(load_expert, path)
            except (ValueError, OSError) as exc:
                raise T2HTTPError(str(exc), param="path") from None
            e = Expert(name=name, z=e.z, base_model=e.base_model, fingerprint=e.fingerprint,
                       extra=e.extra)
            # A replacement waits for the requests using the old z (new ones wait for it), so
            # no request sees its expert change mid-generation.
            swap = None
            if name in self.frontend.names:
                swap = self.swapping[name] = asyncio.Event()
            try:
                if swap is not None and not await self._drain(name):
                    raise T2HTTPError(f"expert {name!r} is still used by {self.in_flight[name]} "
                                      f"request(s) after {DRAIN_TIMEOUT_S:.0f} s; not replaced",
                                      param="name", status=HTTPStatus.CONFLICT)
                encoded, digest = await asyncio.to_thread(
                    lambda: (encode_expert(e), expert_digest(e)))
                results = await self._rpc("t2_load_experts", [encoded], None)
                self.frontend.add(name, digest)
                self._check_order(results)
            finally:
                if swap is not None:
                    del self.swapping[name]
                    swap.set()
            self.paths[name] = str(Path(path).resolve())
        return self.card(name)

    async def unload(self, name: str) -> dict:
        """Unload ``name`` from every worker once the requests using it have finished.

        New requests naming it are refused at once (404 / 400); the unload waits up to
        ``DRAIN_TIMEOUT_S`` for in-flight ones, then gives up with 409 and keeps the expert.
        """
        async with self.lock:
            if name not in self.frontend.names:
                raise T2HTTPError(f"expert {shown(name)} is not loaded; loaded: "
                                  f"{self.frontend.names or '(none)'}", param="name",
                                  status=HTTPStatus.NOT_FOUND)
            digest = self.frontend.digests.get(name, "")
            names_before = self.names
            self.frontend.remove(name)
            if not await self._drain(name):
                self._restore(names_before, name, digest)
                raise T2HTTPError(f"expert {name!r} is still used by {self.in_flight[name]} "
                                  f"request(s) after {DRAIN_TIMEOUT_S:.0f} s; not unloaded",
                                  param="name", status=HTTPStatus.CONFLICT)
            try:
                results = await self._rpc("t2_unload_experts", [name])
            except T2HTTPError:             # the workers still hold it: so does the bank
                self._restore(names_before, name, digest)
                raise
            self._check_order(results)
            self.paths.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}

    def _restore(self, names_before: list[str], name: str, digest: str) -> None:
        """Put ``name`` back at its bank position in the front end's list."""
        with self.frontend.lock:
            self.frontend.names[:] = names_before
            self.frontend.digests[name] = digest

    async def _drain(self, name: str) -> bool:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        async with self.drained:
            while self.in_flight[name] > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self.drained.wait(), timeout=left)
                except asyncio.TimeoutError:
                    return False
        return True

    async def _rpc(self, method: str, *args) -> list:
        from ..vllm.worker import worker_error
        results = await self.engine_client.collective_rpc(method, args=args)
        error = worker_error(results)
        if error is not None:
            raise T2HTTPError(f"{method} failed in a worker: {error}")
        return results

    def _check_order(self, results) -> None:
        from ..vllm.worker import check_bank_order
        check_bank_order(results, self.frontend.names)

    # ---- listing ------------------------------------------------------------------------
    def card(self, name: str) -> dict:
        """``/v1/models`` entry of an expert (shaped like vLLM's LoRA cards; ``root`` is the
        expert's name, not its file: responses carry no server paths)."""
        return {"id": name, "object": "model", "created": int(time.time()),
                "owned_by": "t2fast", "root": name, "parent": self.base_names[0],
                "max_model_len": None, "permission": []}

    async def info(self) -> dict:
        """Experts in bank order, in-flight use, and each worker's settings and statistics."""
        workers = await self._rpc("t2_info")
        return {"experts": [{**self.card(n), "in_flight": self.in_flight[n]}
                            for n in self.names],
                "max_experts": self.frontend.max_experts, "workers": workers}
