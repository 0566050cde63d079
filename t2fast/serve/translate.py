"""What a t2fast HTTP request may say about its mixture, and its translation for vLLM.

A request to ``/v1/completions`` or ``/v1/chat/completions`` names its mixture in one of these
ways (``extra_body`` of the ``openai`` client puts keys at the top level of the JSON body):

==============================  =============================================================
``"model": "<expert>"``         that expert (experts are listed in ``/v1/models``)
``t2_expert``                   an expert name (or ``"base"``)
``t2_alpha``                    α: a list in bank order, ``{name: weight}``, or per layer
``t2``                          ``{"expert": ...}`` / ``{"alpha": ...}`` (or its JSON string)
``t2_adapt``                    ``"prompt"``, ``"classifier"`` or ``"none"``: the server runs
                                pass 1 and picks the expert itself; ``"profile:NAME"``: a
                                saved α (:mod:`t2fast.serve.profiles`)
==============================  =============================================================

each either at the top level or inside ``vllm_xargs`` — at most one of them per request. Any
other key starting with ``t2`` (``t2_experts``, ``t2-alpha`` ...) and the look-alikes
``expert``, ``experts``, ``alpha``, ``adapt`` and ``mixture`` at the top level are refused with
HTTP 400 instead of being ignored (vLLM ignores unknown fields, which would silently serve the
base model).

:func:`translate` turns the body into what vLLM's own routes take: the base model's name in
``"model"`` and the mixture as ``vllm_xargs["t2"]`` (a JSON string, since ``vllm_xargs`` only
holds strings, numbers and flat lists). The mixture itself is validated by the engine's front
end (:mod:`t2fast.vllm.frontend`), the one place that knows the bank. The keys, fields and
conversions are :mod:`t2fast.mixtures`' request vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from ..messages import cap_text, shown
from ..mixtures import ADAPT_FIELD, ADAPT_KEY, ALPHA_FIELD, EXPERT_FIELD, FLAT_KEYS, \
    PROFILE_PREFIX, REQUEST_KEY, Mixture, looks_like_request_key, profile_name, request_spec, \
    xargs_value

XARGS = "vllm_xargs"
T2_KEYS = (REQUEST_KEY, *FLAT_KEYS, ADAPT_KEY)
ADAPT_MODES = ("none", "prompt", "classifier")
LOOKALIKES = (EXPERT_FIELD, EXPERT_FIELD + "s", ALPHA_FIELD, ADAPT_FIELD, "mixture")
#: Routes whose bodies are translated.
ROUTES = ("/v1/completions", "/v1/chat/completions")
#: The deepest a request body on those routes may nest (JSON schemas of structured outputs
#: stay far below; the JSON parser and every tool that re-reads the body recurse per level).
MAX_BODY_DEPTH = 128


class T2HTTPError(Exception):
    """A request the server refuses before vLLM sees it (``status``: 400, 404 or 409)."""

    def __init__(self, message: str, param: str | None = None,
                 status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        message = cap_text(message)
        super().__init__(message)
        self.message = message
        self.param = None if param is None else cap_text(param, 80)
        self.status = status

    def payload(self) -> dict:
        """The body of vLLM's (and OpenAI's) error responses."""
        kind = {HTTPStatus.NOT_FOUND: "NotFoundError",
                HTTPStatus.CONFLICT: "ConflictError"}.get(self.status, "BadRequestError")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": int(self.status)}}


@dataclass
class Translated:
    """A request after :func:`translate`.

    Attributes:
        body: the JSON body for vLLM's route (a new dict; the input is not changed).
        spec: the raw mixture (``{"expert": ...}`` / ``{"alpha": ...}`` or a JSON string), or
            None for the base model or when pass 1 is still to choose it.
        key: the key that named the mixture (``"t2_alpha"``, ``"vllm_xargs.t2"``,
            ``"model"`` ...), for error texts; None when no key did.
        adapt: ``"prompt"`` or ``"classifier"`` when the server must run pass 1, else None.
        adapt_is_default: ``adapt`` is the server's default, not the request's own.
        via_model: the expert named by ``"model"``, if any.
    """
    body: dict
    spec: object = None
    key: str | None = None
    adapt: str | None = None
    adapt_is_default: bool = False
    via_model: str | None = None


def translate(body, expert_names, base_names, default_adapt: str = "none") -> Translated:
    """Check the t2 keys of a request body and move them where vLLM's routes carry them.

    Args:
        body: the parsed JSON body (anything else is passed through for vLLM to judge).
        expert_names: the loaded experts (what ``"model"`` may name besides the base).
        base_names: the served names of the base model (the first is used for experts).
        default_adapt: the server's ``t2_adapt`` for requests that name no mixture.
    Raises:
        T2HTTPError naming the offending key.
    """
    if not isinstance(body, dict):
        return Translated(body)
    body = dict(body)
    xargs = body.get(XARGS)
    if xargs is None:
        xargs = {}
    if not isinstance(xargs, dict):
        return Translated(body)  # vLLM's own validation reports it
    xargs = dict(xargs)
    for where, d in (("", body), (f"{XARGS}.", xargs)):
        for k in d:
            if looks_like_request_key(k) and k not in T2_KEYS:
                raise T2HTTPError(f"unknown t2fast key {shown(where + k)}; known keys: "
                                  f"{', '.join(T2_KEYS)}", param=where + k)
    for where, d in (("", body), (f"{XARGS}.", xargs)):
        for k in LOOKALIKES:
            if k in d:
                raise T2HTTPError(f"unknown field {shown(where + k)}: t2fast mixtures go in "
                                  f"{', '.join(T2_KEYS)} (top level or {XARGS})",
                                  param=where + k)
    in_xargs = {k: f"{XARGS}.{k}" for k in T2_KEYS if k in xargs}
    for k in T2_KEYS:
        if k in body:
            if k in xargs:
                raise T2HTTPError(f"{k!r} is given both at the top level and in {XARGS}",
                                  param=k)
            xargs[k] = body.pop(k)
    given = [k for k in T2_KEYS if k in xargs]
    model = body.get("model")
    via_model = model if isinstance(model, str) and model in expert_names else None
    if via_model is not None:
        given.insert(0, "model")
    if len(given) > 1:
        raise T2HTTPError(f"give one mixture per request, got {' and '.join(given)}",
                          param=given[1])
    out = Translated(body, key=in_xargs.get(given[0], given[0]) if given else None)
    if via_model is not None:
        body["model"] = base_names[0]
        out.spec, out.via_model = {EXPERT_FIELD: via_model}, via_model
    elif given and given[0] == ADAPT_KEY:
        out.adapt = _adapt_mode(xargs.pop(ADAPT_KEY), out.key)
    elif given:
        out.spec = request_spec(given[0], xargs.pop(given[0]))
    elif model in (None, "") or model in base_names:  # vLLM serves "" as the base model
        out.adapt = _adapt_mode(default_adapt, "the server's default adapt mode")
        out.adapt_is_default = out.adapt is not None
    if out.spec is not None:
        xargs[REQUEST_KEY] = xargs_value(out.spec)
    if xargs:
        body[XARGS] = xargs
    else:
        body.pop(XARGS, None)
    return out


def check_depth(body, limit: int = MAX_BODY_DEPTH) -> None:
    """Refuse a parsed body nested more than ``limit`` levels deep (walked without recursion).

    Raises:
        T2HTTPError (400) naming the top-level field that nests too deep.
    """
    if not isinstance(body, (dict, list)):
        return
    stack = [(v, 2, k if isinstance(body, dict) else None)
             for k, v in (body.items() if isinstance(body, dict) else enumerate(body))
             if isinstance(v, (dict, list))]
    while stack:
        value, depth, field = stack.pop()
        if depth > limit:
            raise body_too_deep(field)
        items = value.values() if isinstance(value, dict) else value
        stack += [(v, depth + 1, field) for v in items if isinstance(v, (dict, list))]


def body_too_deep(field=None) -> T2HTTPError:
    """The 400 of a body nested deeper than :data:`MAX_BODY_DEPTH` (``field``: where)."""
    where = f"field {shown(field)} of the request body" if field is not None else \
        "the request body"
    return T2HTTPError(f"{where} is JSON nested more than {MAX_BODY_DEPTH} levels deep",
                       param=field)


def t2_keys_in(body) -> list[str]:
    """The t2-looking keys of a body sent to a route that does not serve mixtures: top-level,
    in ``vllm_xargs``, and in ``sampling_params.extra_args`` (vLLM's token-in route
    ``/inference/v1/generate`` hands those to the engine, bypassing pass 1 and the count of
    requests in flight)."""
    if not isinstance(body, dict):
        return []
    params = body.get("sampling_params")
    places = {XARGS: body.get(XARGS),
              "sampling_params.extra_args": params.get("extra_args")
              if isinstance(params, dict) else None}
    return [k for k in body if looks_like_request_key(k)] + \
        [f"{where}.{k}" for where, keys in places.items() if isinstance(keys, dict)
         for k in keys if looks_like_request_key(k)]


def _adapt_mode(value, what: str) -> str | None:
    if value not in ADAPT_MODES and profile_name(value) is None:
        raise T2HTTPError(f"{what} must be one of {', '.join(ADAPT_MODES)} or "
                          f"'{PROFILE_PREFIX}NAME', got {shown(value)}", param=ADAPT_KEY)
    return None if value == "none" else value


def set_mixture(body: dict, mixture: Mixture) -> None:
    """Make ``mixture`` the engine's mixture of a translated body, by expert name (the key is
    dropped for the base model).

    The engine reads what the body carries after the request waited its turn: the mixture the
    middleware checked, counted in flight and named in ``x-t2-mixture`` then stays the one
    served, whatever experts were loaded or unloaded meanwhile (an α list read again would
    index the bank as it is then).
    """
    xargs = dict(body.get(XARGS) or {})
    if mixture.is_base:
        xargs.pop(REQUEST_KEY, None)
    else:
        xargs[REQUEST_KEY] = xargs_value({ALPHA_FIELD: mixture.normal})
    if xargs:
        body[XARGS] = xargs
    else:
        body.pop(XARGS, None)


def set_prompt_text(path: str, body: dict, text: str) -> None:
    """Make ``text`` the prompt :func:`prompt_text` reads from ``body`` (the completion prompt,
    or the last user message of a chat, whose list is copied, not changed in place)."""
    if path.endswith("/chat/completions"):
        msgs = list(body["messages"])
        last = max(i for i, m in enumerate(msgs)
                   if isinstance(m, dict) and m.get("role") == "user")
        msgs[last] = {**msgs[last], "content": text}
        body["messages"] = msgs
    else:
        body["prompt"] = [text] if isinstance(body.get("prompt"), list) else text


def prompt_text(path: str, body: dict) -> str:
    """The text pass 1 classifies: the completion prompt, or the last user message of a chat.

    Raises:
        T2HTTPError when there is no single text prompt.
    """
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"] \
            if isinstance(msgs, list) else []
        if users:
            content = users[-1].get("content")
            if isinstance(content, list):
                texts = [p.get("text") for p in content
                         if isinstance(p, dict) and p.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    raise T2HTTPError("messages: a text part's 'text' must be a string",
                                      param="messages")
                content = "".join(texts)
            if isinstance(content, str) and content.strip():
                return content
        raise T2HTTPError(f"{ADAPT_KEY} needs a user message with text", param=ADAPT_KEY)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    raise T2HTTPError(f"{ADAPT_KEY} needs one text prompt (a string), got "
                      f"{type(prompt).__name__}", param=ADAPT_KEY)
