"""vLLM endpoint plugin (entry point ``vllm.endpoint_plugins: t2fast``): t2fast's HTTP surface
on vLLM's own OpenAI-compatible server.

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS`` (``t2fast serve`` does
that). The plugin

* adds :class:`t2fast.serve.middleware.T2RequestMiddleware` (t2 keys, ``"model": "<expert>"``,
  automatic adaptation) in front of vLLM's completion and chat routes;
* replaces ``GET /v1/models`` with vLLM's list plus one card per loaded expert;
* adds ``GET /v1/t2/experts`` (experts, in-flight use, worker statistics) and, when run-time
  loading is allowed, ``POST /v1/t2/experts`` ``{"name", "path", "replace"}`` (``path``
  inside the run-time loading root) and ``DELETE /v1/t2/experts/{name}``.

On an engine that is not a t2fast engine it adds nothing to the state and its routes answer 404.
"""
from __future__ import annotations

import logging
import os
from http import HTTPStatus

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..messages import shown, shown_list
from .middleware import STATE_ATTR, T2RequestMiddleware, T2Server
from .translate import T2HTTPError, body_too_deep

logger = logging.getLogger("t2fast.serve")
router = APIRouter()


def _server(request: Request) -> T2Server:
    server = getattr(request.app.state, STATE_ATTR, None)
    if server is None:
        raise T2HTTPError("this server's model is not a t2fast model",
                          status=HTTPStatus.NOT_FOUND)
    return server


def _error(exc: T2HTTPError) -> JSONResponse:
    return JSONResponse(exc.payload(), status_code=int(exc.status))


@router.get("/v1/models")
async def list_models(request: Request):
    """vLLM's model list (the base model, LoRA adapters) plus the loaded experts; a ``root``
    that is a server path (vLLM gives the model's folder) is replaced by the model's id."""
    models = await request.app.state.openai_serving_models.show_available_models()
    out = models.model_dump()
    for card in out["data"]:
        root = card.get("root")
        if isinstance(root, str) and (os.path.isabs(root) or os.path.exists(root)):
            card["root"] = card["id"]
    server = getattr(request.app.state, STATE_ATTR, None)
    if server is not None:
        out["data"] += [server.experts.card(n) for n in server.experts.names]
    return JSONResponse(out)


@router.get("/v1/t2/experts")
async def list_experts(request: Request):
    try:
        return JSONResponse(await _server(request).experts.info())
    except T2HTTPError as exc:
        return _error(exc)


@router.post("/v1/t2/experts")
async def load_expert(request: Request):
    """Body ``{"name": str, "path": str, "replace": bool = false}`` (``path`` relative to the
    run-time loading root, or absolute inside it); 200 with the model card."""
    try:
        server = _server(request)
        if not server.config.allow_runtime_loading:
            raise T2HTTPError("run-time expert loading is disabled; start the server with "
                              "--allow-runtime-loading", status=HTTPStatus.FORBIDDEN)
        try:
            body = await request.json()
        except RecursionError:
            raise body_too_deep() from None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise T2HTTPError('the body must be a JSON object {"name": ..., "path": ...}')
        unknown = sorted(set(body) - {"name", "path", "replace"})
        if unknown:
            raise T2HTTPError(f"unknown field(s) {shown_list(unknown)}; expected name, path, "
                              f"replace", param=unknown[0])
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise T2HTTPError(f"'replace' must be true or false, got {shown(replace)}",
                              param="replace")
        card = await server.experts.load_from_client(body.get("name"), body.get("path"),
                                                     replace)
        logger.info("t2fast: loaded expert %r from %s; bank: %s", card["id"],
                    server.experts.paths[card["id"]], server.experts.names)
        return JSONResponse(card)
    except T2HTTPError as exc:
        return _error(exc)


@router.delete("/v1/t2/experts/{name}")
async def unload_expert(name: str, request: Request):
    try:
        server = _server(request)
        if not server.config.allow_runtime_loading:
            raise T2HTTPError("run-time expert loading is disabled; start the server with "
                              "--allow-runtime-loading", status=HTTPStatus.FORBIDDEN)
        out = await server.experts.unload(name)
        logger.info("t2fast: unloaded expert %r; bank: %s", name, server.experts.names)
        return JSONResponse(out)
    except T2HTTPError as exc:
        return _error(exc)


class T2EndpointPlugin:
    """The object vLLM's ``vllm.endpoint_plugins`` loader instantiates."""

    name = "t2fast"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(T2RequestMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        from .startup import build_server

        if engine_client is None:
            return
        server = await build_server(engine_client, args)
        if server is not None:
            setattr(state, STATE_ATTR, server)
