"""Per-request mixtures: parsing and validating ``SamplingParams.extra_args["t2"]`` at the front
end, and the automatic prefix-cache salt of each mixture.

A request names its mixture with one of::

    extra_args={"t2": {"expert": "math"}}                      # one expert ("base" = no expert)
    extra_args={"t2": {"alpha": {"math": 0.3, "code": 0.7}}}   # α by name (may include "base")
    extra_args={"t2": {"alpha": [0.3, 0.7]}}                   # α in bank order
    extra_args={"t2": {"alpha": [[...K...], ...L...]}}         # per-layer α, bank order
    extra_args={"t2": {"alpha": {"math": [...L...]}}}          # per-layer α by name
    extra_args={"t2": "math"}                                  # shorthand for {"expert": ...}
    extra_args={"t2_expert": "math"} / {"t2_alpha": [0.3, 0.7]}  # flat (OpenAI ``vllm_xargs``)

No ``"t2"`` key (or ``{}``) is the base model. ``z' = α_base·1 + Σ_k α_k z_k`` per adapted matrix.

The front end (the process that owns the engine's ``InputProcessor``) rejects unknown experts,
wrong lengths, non-numbers and NaN/Inf with :class:`T2RequestError` (a ``ValueError`` and a vLLM
validation error, i.e. HTTP 400 in ``vllm serve``) before the request reaches the engine, then
replaces the spec by its *normal form* (``{"alpha": {name: weight or [per-layer weights]}}``) and
salts the request's prefix-cache key with a digest of the mixture (and of the experts' contents),
so KV blocks are never shared between different mixtures.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import threading
from pathlib import Path

from .config import REQUEST_KEY, T2Config, config_from_vllm, is_t2_model_config, \
    num_decoder_layers

BASE = "base"
NORMAL_FORM_VERSION = 1
_SPEC_KEYS = ("expert", "alpha")

try:  # a vLLM validation error maps to HTTP 400 in the OpenAI server
    from vllm.exceptions import VLLMValidationError as _ValidationBase
except Exception:  # noqa: BLE001 - vllm missing: keep the module importable
    class _ValidationBase(Exception):
        def __init__(self, message, *, parameter=None, value=None):
            super().__init__(message)
            self.parameter = parameter
            self.value = value


class T2RequestError(_ValidationBase, ValueError):
    """A request's ``extra_args["t2"]`` is invalid (unknown expert, bad α ...)."""

    def __init__(self, message: str):
        super().__init__(f"extra_args['{REQUEST_KEY}']: {message}", parameter="extra_args")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise T2RequestError(f"{what} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise T2RequestError(f"{what} must be finite, got {v}")
    return v


def _weight(v, what: str, num_layers: int):
    """A scalar weight, or a list of ``num_layers`` weights (collapsed when all equal)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if len(v) != num_layers:
            raise T2RequestError(f"{what} is a per-layer list of {len(v)} weights; the model has "
                                 f"{num_layers} decoder layers")
        ws = [_number(x, f"{what}[{i}]") for i, x in enumerate(v)]
        return ws[0] if all(w == ws[0] for w in ws) else ws
    return _number(v, what)


def normalize_spec(raw, names, num_layers: int):
    """Validate a request's ``extra_args["t2"]`` and return its normal form.

    Args:
        raw: the value of ``extra_args["t2"]`` (see the module docstring).
        names: the loaded experts' names, in bank order.
        num_layers: decoder layers of the model (for per-layer α).
    Returns:
        ``None`` for the base model, else ``{"alpha": {name: float | [float] * num_layers}}``
        with zero weights dropped (an all-zero α becomes ``{"base": 0.0}``).
    Raises:
        T2RequestError naming the problem.
    """
    names = list(names)
    if raw is None:
        return None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise T2RequestError(f"is a string that is not valid JSON ({exc})") from None
    if isinstance(raw, str):
        raw = {"expert": raw}
    if not isinstance(raw, dict):
        raise T2RequestError(f"must be a dict such as {{'expert': 'math'}} or "
                             f"{{'alpha': {{'math': 0.5, 'code': 0.5}}}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_SPEC_KEYS) - {"v"})
    if unknown:
        raise T2RequestError(f"unknown key(s) {unknown}; use 'expert' or 'alpha'")
    if "expert" in raw and "alpha" in raw:
        raise T2RequestError("give either 'expert' or 'alpha', not both")

    def check_name(n):
        if not isinstance(n, str):
            raise T2RequestError(f"expert names must be strings, got {n!r}")
        if n != BASE and n not in names:
            raise T2RequestError(f"unknown expert {n!r}; loaded experts: "
                                 f"{names or '(none)'} (or 'base')")
        return n

    if "expert" in raw:
        e = raw["expert"]
        if e is None:
            return None
        check_name(e)
        return None if e == BASE else {"alpha": {e: 1.0}}
    if "alpha" not in raw:
        return None
    a = raw["alpha"]
    if hasattr(a, "tolist") and not isinstance(a, dict):
        a = a.tolist()
    weights: dict = {}
    if isinstance(a, dict):
        for n, w in a.items():
            weights[check_name(n)] = _weight(w, f"alpha[{n!r}]", num_layers)
    elif isinstance(a, (list, tuple)):
        K = len(names)
        per_layer = len(a) > 0 and all(isinstance(r, (list, tuple)) for r in a)
        if per_layer:
            if len(a) != num_layers or any(len(r) != K for r in a):
                raise T2RequestError(
                    f"per-layer alpha must have shape ({num_layers}, {K}) (layers × experts in "
                    f"bank order {names}), got {len(a)} rows of lengths "
                    f"{sorted({len(r) for r in a})}")
            for k, n in enumerate(names):
                weights[n] = _weight([r[k] for r in a], f"alpha[:, {k}]", num_layers)
        else:
            if len(a) != K:
                raise T2RequestError(
                    f"alpha has {len(a)} weights; expected {K}, one per loaded expert in bank "
                    f"order {names}" + (" (no experts are loaded)" if not K else ""))
            for k, n in enumerate(names):
                weights[n] = _weight(a[k], f"alpha[{k}]", num_layers)
    else:
        raise T2RequestError(f"alpha must be a dict {{name: weight}} or a list in bank order, "
                             f"got {type(a).__name__}")
    weights = {n: w for n, w in weights.items()
               if not (isinstance(w, float) and w == 0.0)}
    if not weights:
        return {"alpha": {BASE: 0.0}}
    if list(weights) == [BASE] and weights[BASE] == 1.0:
        return None
    return {"alpha": dict(sorted(weights.items()))}


def mixture_key(normal) -> str | None:
    """A stable string for a normal-form mixture (None for the base model)."""
    if normal is None:
        return None
    return json.dumps(normal["alpha"], sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# The front end's view of the bank
# --------------------------------------------------------------------------------------------
def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def expert_digest(expert) -> str:
    """Digest of an in-memory :class:`t2fast.experts.Expert`'s z vectors."""
    h = hashlib.sha256(expert.name.encode())
    for n in sorted(expert.z):
        h.update(n.encode())
        h.update(expert.z[n].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def expert_file_name(path) -> str:
    """The ``name`` recorded in an expert file's metadata (the file stem when absent)."""
    from ..safetensors_io import T2FileError

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise T2FileError(f"expert file {str(path)!r} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - report unreadable files uniformly
        raise T2FileError(f"expert file {str(path)!r} cannot be read: {exc}") from None
    return meta.get("name") or Path(path).stem


class FrontEnd:
    """What the front end knows of an engine's experts: names in bank order and digests."""

    def __init__(self, num_layers: int, max_experts: int):
        self.num_layers = num_layers
        self.max_experts = max_experts
        self.names: list[str] = []
        self.digests: dict[str, str] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "FrontEnd":
        cfg: T2Config = config_from_vllm(vllm_config)
        fe = cls(num_decoder_layers(vllm_config.model_config), cfg.max_experts)
        for p in cfg.experts:
            fe.add(expert_file_name(p), file_digest(p))
        return fe

    def add(self, name: str, digest: str) -> None:
        with self.lock:
            if name == BASE:
                raise ValueError(f"an expert may not be called {BASE!r}")
            if name not in self.names:
                if len(self.names) >= self.max_experts:
                    raise ValueError(f"the expert bank is full ({self.max_experts} experts); "
                                     f"unload one or start the engine with a larger "
                                     f"max_experts")
                self.names.append(name)
            self.digests[name] = digest

    def remove(self, name: str) -> None:
        with self.lock:
            if name in self.names:
                self.names.remove(name)
            self.digests.pop(name, None)

    def normalize(self, raw):
        with self.lock:
            return normalize_spec(raw, self.names, self.num_layers)

    def salt(self, normal) -> str | None:
        """Prefix-cache salt of a normal-form mixture (None for the base model)."""
        key = mixture_key(normal)
        if key is None:
            return None
        with self.lock:
            digests = {n: self.digests.get(n, "") for n in normal["alpha"] if n != BASE}
        h = hashlib.sha256(key.encode())
        h.update(json.dumps(digests, sort_keys=True).encode())
        return "t2fast-" + h.hexdigest()[:32]


def combine_salt(user_salt: str | None, t2_salt: str | None) -> str | None:
    if t2_salt is None:
        return user_salt
    return t2_salt if not user_salt else f"{user_salt}|{t2_salt}"


# --------------------------------------------------------------------------------------------
# The InputProcessor hook (installed by the plugin; inert for engines that are not t2fast's)
# --------------------------------------------------------------------------------------------
_FE_ATTR = "_t2fast_frontend"
_NOT_T2 = object()


def frontend_of(input_processor):
    """The :class:`FrontEnd` of an engine's InputProcessor, or None when it is not t2fast's."""
    fe = input_processor.__dict__.get(_FE_ATTR)
    if fe is None:
        vc = getattr(input_processor, "vllm_config", None)
        if vc is None or not is_t2_model_config(vc.model_config):
            fe = _NOT_T2
        else:
            fe = FrontEnd.from_vllm_config(vc)
        input_processor.__dict__[_FE_ATTR] = fe
    return None if fe is _NOT_T2 else fe


FLAT_KEYS = {f"{REQUEST_KEY}_expert": "expert", f"{REQUEST_KEY}_alpha": "alpha"}


def extract_spec(extra_args) -> tuple[bool, object]:
    """``(present, raw spec)`` from a request's ``extra_args``.

    ``extra_args["t2"]`` (a dict, an expert name, or a JSON string), or the flat keys
    ``t2_expert`` / ``t2_alpha`` — the OpenAI server's ``vllm_xargs`` accepts only strings,
    numbers and lists of them, so ``{"vllm_xargs": {"t2_alpha": [0.3, 0.7]}}`` or
    ``{"vllm_xargs": {"t2": "{\"alpha\": {\"math\": 0.3}}"}}`` work there.
    """
    if not extra_args:
        return False, None
    if REQUEST_KEY in extra_args:
        return True, extra_args[REQUEST_KEY]
    flat = {v: extra_args[k] for k, v in FLAT_KEYS.items() if k in extra_args}
    if flat:
        return True, flat
    return False, None


def _raw_spec(params):
    return extract_spec(getattr(params, "extra_args", None))


def install_input_processor_hook() -> None:
    """Wrap ``InputProcessor.process_inputs`` once: validate and normalize ``extra_args["t2"]``,
    salt the prefix cache per mixture. Engines without a t2fast architecture are untouched."""
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, "_t2fast_hook", False):
        return

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        fe = frontend_of(self)
        if fe is None:
            return orig(self, request_id, prompt, params, *args, **kwargs)
        present, raw = _raw_spec(params)
        normal = fe.normalize(raw) if present else None   # raises T2RequestError
        request = orig(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(request, "sampling_params", None)
        if sp is not None and present:
            extra = {k: v for k, v in (sp.extra_args or {}).items() if k not in FLAT_KEYS}
            if normal is None:
                extra.pop(REQUEST_KEY, None)
            else:
                extra[REQUEST_KEY] = {**normal, "v": NORMAL_FORM_VERSION}
            sp.extra_args = extra or None
        salt = fe.salt(normal)
        if salt is not None:
            request.cache_salt = combine_salt(request.cache_salt, salt)
        return request

    process_inputs._t2fast_hook = True
    process_inputs.__wrapped__ = orig
    process_inputs.__doc__ = orig.__doc__
    InputProcessor.process_inputs = process_inputs
