"""The ASGI middleware that puts t2fast's request forms in front of vLLM's own routes.

For ``POST /v1/completions`` and ``/v1/chat/completions`` it reads the JSON body and

1. refuses unknown t2 keys and conflicting mixtures (:func:`t2fast.serve.translate.translate`,
   HTTP 400), maps ``"model": "<expert>"`` to the base model plus that expert;
2. runs pass 1 when the request asks for ``t2_adapt`` (:class:`t2fast.serve.adapt.Adapter`);
3. validates the mixture with the engine front end's parser (400, with the same message the
   engine would give) and counts the request as in flight for the experts it uses;
4. hands the rewritten body to vLLM's route and adds ``x-t2-*`` headers to its response (whose
   ``"model"`` is the expert's name when the request named the expert as its model).

Other ``POST`` routes (``/v1/responses`` ...) are refused with 400 when their body carries a
t2 key, since they would ignore it. Everything else, and every request when the engine is not a
t2fast engine, passes through untouched.
"""
from __future__ import annotations

import json
from http import HTTPStatus

from .adapt import HEADER_ADAPT, HEADER_ALPHA, HEADER_EXPERT
from .profiles import PREFIX
from .translate import (ADAPT_KEY, ROUTES, T2HTTPError, prompt_text, set_spec, t2_keys_in,
                        translate)

STATE_ATTR = "t2fast"
#: t2fast's own routes (their bodies are not requests for a model).
T2_ROUTES = "/v1/t2/"


class T2RequestMiddleware:
    """Pure ASGI middleware (it must see and replace the request body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        server = getattr(scope["app"].state, STATE_ATTR, None) \
            if scope["type"] == "http" and scope.get("method") == "POST" else None
        if server is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path.endswith(r)), None)
        ctype = dict(scope.get("headers", [])).get(b"content-type", b"")
        if route is None and b"json" not in ctype:  # uploads etc.: not read
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:  # not JSON: vLLM's own validation answers
            return await self.app(scope, _replay(raw, receive), send)
        if route is None:  # other routes do not serve mixtures: say so rather than ignore
            keys = t2_keys_in(body) if not path.startswith(T2_ROUTES) else []
            if keys:
                err = T2HTTPError(f"{path} does not serve t2fast mixtures (got {keys}); use "
                                  f"{' or '.join(ROUTES)}", param=keys[0])
                return await _send_json(send, err.status, err.payload())
            return await self.app(scope, _replay(raw, receive), send)
        try:
            new_body, normal, headers = await server.prepare(route, body)
        except T2HTTPError as exc:
            return await _send_json(send, exc.status, exc.payload())
        if headers.get(HEADER_EXPERT) and body.get("model") == headers[HEADER_EXPERT]:
            send = _renaming(send, body["model"])  # answer as the model that was asked for
        used = await server.experts.acquire(normal)
        data = json.dumps(new_body).encode()
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"] + \
            [(b"content-length", str(len(data)).encode())]
        try:
            await self.app(scope, _replay(data, receive), _with_headers(send, headers))
        finally:
            await server.experts.release(used)


class T2Server:
    """What the middleware and the t2fast routes share (``app.state.t2fast``).

    Args:
        experts: :class:`t2fast.serve.experts.ServedExperts`.
        adapter: :class:`t2fast.serve.adapt.Adapter`.
        config: :class:`t2fast.serve.config.ServeConfig`.
    """

    def __init__(self, experts, adapter, config, profiles: dict | None = None):
        self.experts = experts
        self.adapter = adapter
        self.config = config
        self.profiles = dict(profiles or {})   # name -> α {expert: weight}

    async def prepare(self, route: str, body) -> tuple[object, object, dict]:
        """(body for vLLM, normal-form mixture or None, response headers) of one request.

        Raises:
            T2HTTPError (400 for a bad t2 key or mixture).
        """
        tr = translate(body, self.experts.names, self.experts.base_names, self.config.adapt)
        headers = {}
        if tr.adapt is not None and tr.adapt.startswith(PREFIX):
            name = tr.adapt[len(PREFIX):]
            if name not in self.profiles:
                raise T2HTTPError(f"unknown profile {name!r}; served profiles: "
                                  f"{sorted(self.profiles) or '(none)'}", param=ADAPT_KEY)
            tr.spec = {"alpha": self.profiles[name]}
            set_spec(tr.body, tr.spec)
            headers = {HEADER_ADAPT: tr.adapt, HEADER_ALPHA: json.dumps(self.profiles[name])}
        elif tr.adapt is not None:
            choice = await self.adapter.choose(tr.adapt, prompt_text(route, tr.body),
                                               self.experts.names)
            tr.spec = None if choice.expert is None else {"expert": choice.expert}
            set_spec(tr.body, tr.spec)
            headers = choice.headers(tr.adapt)
        elif tr.via_model is not None:
            headers = {HEADER_EXPERT: tr.via_model}
        try:
            normal = None if tr.spec is None else self.experts.normalize(tr.spec)
        except ValueError as exc:
            raise T2HTTPError(str(exc), param="t2") from None
        return tr.body, normal, headers


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(data: bytes, receive):
    """A ``receive`` that yields ``data`` once, then defers to the client's (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await receive()

    return replay


def _renaming(send, model: str):
    """Set ``"model"`` to ``model`` in the response body: one JSON object, or server-sent
    events (``data: {...}``), as vLLM answers for a LoRA adapter named as the model."""
    start = None

    async def wrapped(msg):
        nonlocal start
        if msg["type"] == "http.response.start":
            start = msg  # held: the body's length changes
            return
        if msg["type"] == "http.response.body":
            data = _rename(msg.get("body", b""), model)
            if start is not None:
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() != b"content-length"]
                if not msg.get("more_body", False):
                    headers.append((b"content-length", str(len(data)).encode()))
                await send({**start, "headers": headers})
                start = None
            msg = {**msg, "body": data}
        await send(msg)

    return wrapped


def _rename(data: bytes, model: str) -> bytes:
    def one(text: bytes) -> bytes:
        try:
            obj = json.loads(text)
        except ValueError:
            return text
        if isinstance(obj, dict) and "model" in obj:
            obj["model"] = model
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return text

    if data.lstrip().startswith(b"{"):
        return one(data)
    lines = data.split(b"\n")
    return b"\n".join(b"data: " + one(line[6:]) if line.startswith(b"data: ") else line
                       for line in lines)


def _with_headers(send, headers: dict):
    if not headers:
        return send
    extra = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def wrapped(msg):
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": list(msg.get("headers", [])) + extra}
        await send(msg)

    return wrapped


async def _send_json(send, status: HTTPStatus, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": int(status),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
