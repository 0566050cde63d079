"""The ASGI middleware that puts t2fast's request forms in front of vLLM's own routes.

For ``POST /v1/completions`` and ``/v1/chat/completions`` it reads the JSON body and

1. refuses a body nested more than ``MAX_BODY_DEPTH`` levels (HTTP 400) and a ``"model"`` that
   is not served (404 listing the base model and the experts);
2. refuses unknown t2 keys and conflicting mixtures (:func:`t2fast.serve.translate.translate`,
   HTTP 400), maps ``"model": "<expert>"`` to the base model plus that expert;
3. runs pass 1 when the request asks for ``t2_adapt`` (:class:`t2fast.serve.adapt.Adapter`), or
   when the server's default asks for it and the request can take it (with ``--restate``, the
   request then asks its restated question);
4. validates the mixture with the engine front end's parser (400 naming the request's key)
   and counts the request as in flight for the experts it uses;
5. hands the rewritten body to vLLM's route and adds ``x-t2-*`` headers to its response
   (``x-t2-mixture`` always; ``"model"`` is the expert's name when the request named the
   expert as its model).

Other ``POST`` routes (``/v1/responses``, ``/inference/v1/generate`` ...) are refused with
400 when their body carries a t2 key (:func:`t2fast.serve.translate.t2_keys_in`): they would
ignore it or bypass pass 1 and the count of requests in flight. Every error response of a
t2fast server, vLLM's included, has its message capped (no unbounded echo of a client's
value). Everything else, and every request when the engine is not a t2fast engine, passes
through untouched.
"""
from __future__ import annotations

import json
from http import HTTPStatus

from ..messages import MAX_MESSAGE_CHARS, cap_text, shown, shown_list
from ..mixtures import ALPHA_FIELD, BASE, EXPERT_FIELD, Mixture, profile_name
from .adapt import HEADER_ADAPT, HEADER_ADAPT_SKIPPED, HEADER_ALPHA, HEADER_EXPERT, \
    HEADER_MIXTURE, HEADER_RESTATE_MS, HEADER_RESTATED, restated_text
from .translate import (ADAPT_KEY, ROUTES, T2HTTPError, body_too_deep, check_depth,
                        prompt_text, set_mixture, set_prompt_text, t2_keys_in, translate)

STATE_ATTR = "t2fast"
#: t2fast's own routes (their bodies are not requests for a model).
T2_ROUTES = "/v1/t2/"
#: A 404's list of served models stops after about this many characters.
MAX_LISTED_CHARS = 200


class T2RequestMiddleware:
    """Pure ASGI middleware (it must see and replace the request body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        server = getattr(scope["app"].state, STATE_ATTR, None) \
            if scope["type"] == "http" else None
        if server is None:
            return await self.app(scope, receive, send)
        send = _capping_errors(send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path.endswith(r)), None)
        if scope.get("method") != "POST" or (route is None and not _json_body(scope)):
            return await self.app(scope, receive, send)  # uploads etc.: not read
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except RecursionError:  # nested too deep for the parser
            if route is None:
                return await self.app(scope, _replay(raw, receive), send)
            err = body_too_deep()
            return await _send_json(send, err.status, err.payload())
        except ValueError:  # not JSON: vLLM's own validation answers
            return await self.app(scope, _replay(raw, receive), send)
        if route is None:  # other routes do not serve mixtures: say so rather than ignore
            keys = t2_keys_in(body) if not path.startswith(T2_ROUTES) else []
            if keys:
                err = T2HTTPError(f"{path} does not serve t2fast mixtures (got "
                                  f"{shown_list(keys)}); use {' or '.join(ROUTES)}",
                                  param=keys[0])
                return await _send_json(send, err.status, err.payload())
            return await self.app(scope, _replay(raw, receive), send)
        try:
            check_depth(body)
            server.check_model(body, _vllm_model_names(scope))
            new_body, mixture, headers = await server.prepare(route, body)
            data = json.dumps(new_body).encode()
        except T2HTTPError as exc:
            return await _send_json(send, exc.status, exc.payload())
        if headers.get(HEADER_EXPERT) and body.get("model") == headers[HEADER_EXPERT]:
            send = _renaming(send, body["model"])  # answer as the model that was asked for
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"] + \
            [(b"content-length", str(len(data)).encode())]
        used = await server.experts.acquire(mixture)
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

    def check_model(self, body, other_names=()) -> None:
        """404 for a ``"model"`` that is neither the base model, an expert, nor one of
        ``other_names`` (vLLM's LoRA adapters); the text lists what is served, bounded.

        ``other_names=None`` leaves the decision to vLLM (it may resolve LoRA adapters at
        run time).
        """
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model or other_names is None or \
                model in self.experts.base_names or model in self.experts.names or \
                model in other_names:
            return
        served = [*(f"{n} (base model)" for n in self.experts.base_names),
                  *(f"{n} (expert)" for n in self.experts.names), *other_names]
        listed = []
        for name in served:
            if sum(len(n) + 2 for n in listed) + len(name) > MAX_LISTED_CHARS:
                listed.append(f"{len(served) - len(listed)} more (GET /v1/models)")
                break
            listed.append(name)
        raise T2HTTPError(f"The model {shown(model)} does not exist. Served models: "
                          f"{', '.join(listed)}.", param="model", status=HTTPStatus.NOT_FOUND)

    async def prepare(self, route: str, body) -> tuple[object, Mixture, dict]:
        """(body for vLLM, its :class:`~t2fast.mixtures.Mixture`, response headers) of one
        request.

        Every translated request gets :data:`HEADER_MIXTURE` (the mixture's key, or
        ``base``). A server-wide default ``t2_adapt`` that cannot run for a request (no single
        text prompt ...) is skipped: the request gets the base model and
        :data:`HEADER_ADAPT_SKIPPED` says why.

        Raises:
            T2HTTPError (400 for a bad t2 key or mixture).
        """
        if not isinstance(body, dict):  # vLLM's own validation answers
            return body, Mixture(), {}
        tr = translate(body, self.experts.names, self.experts.base_names, self.config.adapt)
        headers, mixture = {}, None
        beams = T2HTTPError("use_beam_search serves the base model: vLLM's beam search drops "
                            "a request's extra arguments, so it cannot carry a mixture; drop "
                            "use_beam_search or the mixture", param="use_beam_search")
        if body.get("use_beam_search") and (tr.via_model is not None or (
                tr.spec is not None and not self.parse(tr.spec, tr.key).is_base)):
            raise beams
        if tr.adapt is not None:
            try:
                if body.get("use_beam_search"):
                    raise beams
                new_body, spec, headers = await self.pass1(route, tr.body, tr.adapt)
                mixture = self.parse(spec, ADAPT_KEY)   # the choice may be gone meanwhile
                tr.body, tr.spec = new_body, spec
            except T2HTTPError as exc:
                if not tr.adapt_is_default:
                    raise
                headers = {HEADER_ADAPT: "none", HEADER_ADAPT_SKIPPED: _header_text(
                    f"server default {tr.adapt}: {exc.message}")}
                mixture = Mixture()
        elif tr.via_model is not None:
            headers = {HEADER_EXPERT: tr.via_model}
        if mixture is None:
            mixture = self.parse(tr.spec, tr.key or ADAPT_KEY)
        headers[HEADER_MIXTURE] = mixture.key or BASE
        set_mixture(tr.body, mixture)
        return tr.body, mixture, headers

    def parse(self, spec, key: str) -> Mixture:
        """The :class:`~t2fast.mixtures.Mixture` of a raw spec (None: the base model).

        Raises:
            T2HTTPError (400) naming ``key``.
        """
        try:
            return Mixture() if spec is None else self.experts.parse(spec)
        except (ValueError, TypeError, OverflowError) as exc:
            raise T2HTTPError(f"{key}: {getattr(exc, 'detail', exc)}", param=key) from None

    async def pass1(self, route: str, body: dict, adapt: str) -> tuple[dict, object, dict]:
        """(body, mixture spec, headers) of a request after pass 1 of ``adapt``: the server's
        restatement first when it restates (the body then asks the restated question), then
        the profile's α or the expert :meth:`Adapter.choose` picks. ``body`` is not changed.

        Raises:
            T2HTTPError (400) when pass 1 cannot run for the request (no single text prompt,
            no expert to choose from, an unknown profile).
        """
        name = profile_name(adapt)
        if name is not None and name not in self.profiles:
            raise T2HTTPError(f"unknown profile {shown(name)}; served profiles: "
                              f"{shown_list(sorted(self.profiles)) or '(none)'}",
                              param=ADAPT_KEY)
        body, headers = dict(body), {}
        if self.adapter.restates:
            text = prompt_text(route, body)
            r = await self.adapter.restate(text)
            if r.question is not None:
                set_prompt_text(route, body, restated_text(text, r.question))
            headers = {HEADER_RESTATED: _header_text(r.question or "none"),
                       HEADER_RESTATE_MS: f"{r.ms:.1f}"}
        if name is not None:
            spec = {ALPHA_FIELD: self.profiles[name]}
            headers.update({HEADER_ADAPT: adapt, HEADER_ALPHA: json.dumps(self.profiles[name])})
        else:
            # the classification expert's own pass is counted, so that it cannot be unloaded
            # or replaced while it classifies
            classifier = self.adapter.classifier if adapt == "classifier" else None
            async with self.experts.using([classifier] if classifier in self.experts.names
                                          else []):
                choice = await self.adapter.choose(adapt, prompt_text(route, body),
                                                   self.experts.names)
            spec = None if choice.expert is None else {EXPERT_FIELD: choice.expert}
            headers.update(choice.headers(adapt))
        return body, spec, headers


def _vllm_model_names(scope) -> list[str] | None:
    """Names vLLM serves besides the base model (its LoRA adapters), or None when vLLM may
    resolve or accept other names at run time."""
    import vllm.envs as envs

    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING or envs.VLLM_SKIP_MODEL_NAME_VALIDATION:
        return None
    models = getattr(scope["app"].state, "openai_serving_models", None)
    return list(getattr(models, "lora_requests", None) or {})


def _json_body(scope) -> bool:
    """Whether a request's body is JSON as the server reads it: its first ``content-type``
    (the one Starlette reads), whatever its case, names a JSON media type."""
    ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
    return b"json" in ctype.split(b";", 1)[0].lower()


def _header_text(text: str) -> str:
    """``text`` as a header value: printable ASCII, at most 200 characters."""
    return cap_text("".join(c if " " <= c <= "~" else "?" for c in text), 200)


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


def _capping_errors(send):
    """Cap the message of every error response (status ≥ 400) at ``MAX_MESSAGE_CHARS``, ours
    and vLLM's alike: an error never echoes an unbounded client value."""
    start, chunks = None, []

    async def wrapped(msg):
        nonlocal start
        if msg["type"] == "http.response.start" and msg.get("status", 200) >= 400:
            start = msg  # held: the body's length may change
            return
        if start is None or msg["type"] != "http.response.body":
            return await send(msg)
        chunks.append(msg.get("body", b""))
        if msg.get("more_body", False):
            return
        data = cap_error_body(b"".join(chunks), start["status"])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    return wrapped


def cap_error_body(data: bytes, status: int) -> bytes:
    """An error body whose message (``{"error": {"message": ...}}``, or the whole text) is at
    most :data:`t2fast.messages.MAX_MESSAGE_CHARS` characters."""
    if len(data) <= MAX_MESSAGE_CHARS:
        return data
    text = data.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        error = {k: v for k, v in error.items() if isinstance(v, (str, int, type(None)))}
        error["message"] = cap_text(error["message"])
        if isinstance(error.get("param"), str):
            error["param"] = cap_text(error["param"], 80)
        return json.dumps({"error": error}).encode()
    try:
        kind = HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        kind = "Error"
    return json.dumps({"error": {"message": cap_text(text), "type": kind, "param": None,
                                 "code": status}}).encode()


async def _send_json(send, status: HTTPStatus, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": int(status),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
