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

The mixture inside the envelope is the language of :mod:`t2fast.mixtures` (the one
``SVFHandle.set_mixture`` speaks). The front end (the process that owns the engine's
``InputProcessor``) rejects unknown experts, wrong lengths, non-numbers, NaN/Inf, weights beyond
the bounds (``T2Config.max_alpha_abs`` / ``max_alpha_l1``) and all-zero α with
:class:`T2RequestError` (a ``ValueError`` and a vLLM validation error, i.e. HTTP 400 in
``vllm serve``) before the request reaches the engine, then
replaces the spec by its *normal form* (``{"alpha": {name: weight or [per-layer weights]}}``) and
salts the request's prefix-cache key with a digest of the mixture (and of the experts' contents),
so KV blocks are never shared between different mixtures.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch

from ..messages import cap_text, shown, shown_list
from ..mixtures import BASE, MAX_NAME_LENGTH, MixtureBounds, MixtureError, check_expert_name, \
    normal_form, parse_mixture
from .config import REQUEST_KEY, T2Config, config_from_vllm, is_t2_model_config, \
    num_decoder_layers

NORMAL_FORM_VERSION = 1
_SPEC_KEYS = ("expert", "alpha")
#: The deepest an α nests: ``{"math": [per-layer weights]}`` or ``[[per-layer row], ...]``.
MAX_ALPHA_DEPTH = 2

try:  # a vLLM validation error maps to HTTP 400 in the OpenAI server
    from vllm.exceptions import VLLMValidationError as _ValidationBase
except Exception:  # noqa: BLE001 - vllm missing: keep the module importable
    class _ValidationBase(Exception):
        def __init__(self, message, *, parameter=None, value=None):
            super().__init__(message)
            self.parameter = parameter
            self.value = value


class T2RequestError(_ValidationBase, ValueError):
    """A request's ``extra_args["t2"]`` is invalid (unknown expert, bad α ...).

    ``detail`` is the problem alone (the HTTP server prefixes the key the client used); both
    texts are capped at :data:`t2fast.messages.MAX_MESSAGE_CHARS`.
    """

    def __init__(self, message: str):
        self.detail = cap_text(message)
        super().__init__(cap_text(f"extra_args['{REQUEST_KEY}']: {message}"),
                         parameter="extra_args")


def _check_name_length(names, what: str) -> None:
    """Refuse names too long to be an expert's before any text quotes them in full."""
    long = next((n for n in names if isinstance(n, str) and len(n) > MAX_NAME_LENGTH), None)
    if long is not None:
        raise T2RequestError(f"{what} {shown(long)}: expert names have at most "
                             f"{MAX_NAME_LENGTH} characters")


def check_alpha_values(alpha, where: str) -> None:
    """Refuse an α nested deeper than :data:`MAX_ALPHA_DEPTH` or holding an integer too large
    for a float, naming the offending entry (walked without recursion)."""
    stack = [(alpha, where, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_ALPHA_DEPTH:
                raise T2RequestError(f"{path} is nested too deep: an α nests at most "
                                     f"{MAX_ALPHA_DEPTH} levels ({{'math': [per-layer weights]}} "
                                     f"or [[per-layer row], ...])")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(v, f"{path}[{shown(k)}]", depth + 1) for k, v in items]
            if isinstance(value, dict):
                _check_name_length(value, f"{path}: unknown expert")
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                raise T2RequestError(f"{path} is an integer too large for a float "
                                     f"({len(str(abs(value)))} digits)") from None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def normalize_spec(raw, names, num_layers: int, bounds: MixtureBounds | None = None):
    """Validate a request's ``extra_args["t2"]`` and return its normal form.

    The envelope (``{"expert": name}``, ``{"alpha": spec}``, a bare expert name or a JSON string
    of either) is unwrapped here; the mixture itself is parsed and bounded by
    :func:`t2fast.mixtures.parse_mixture`, the parser ``SVFHandle.set_mixture`` uses too.

    Args:
        raw: the value of ``extra_args["t2"]`` (see the module docstring).
        names: the loaded experts' names, in bank order.
        num_layers: decoder layers of the model (for per-layer α).
        bounds: :class:`t2fast.mixtures.MixtureBounds` (default ``MixtureBounds()``).
    Returns:
        ``None`` for the base model, else ``{"alpha": {name: float | [float] * num_layers}}``
        (:func:`t2fast.mixtures.normal_form`: zero weights dropped, sorted by name).
    Raises:
        T2RequestError naming the problem.
    """
    names = list(names)
    if raw is None:
        return None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except RecursionError:
            raise T2RequestError("is a JSON string nested too deep") from None
        except ValueError as exc:
            raise T2RequestError(f"is a string that is not valid JSON ({exc})") from None
    if isinstance(raw, str):
        raw = {"expert": raw}
    if not isinstance(raw, dict):
        raise T2RequestError(f"must be a dict such as {{'expert': 'math'}} or "
                             f"{{'alpha': {{'math': 0.5, 'code': 0.5}}}}, got {shown(raw)}")
    unknown = sorted(set(raw) - set(_SPEC_KEYS) - {"v"}, key=str)
    if unknown:
        raise T2RequestError(f"unknown key(s) {shown_list(unknown)}; use 'expert' or 'alpha'")
    if "expert" in raw and "alpha" in raw:
        raise T2RequestError("give either 'expert' or 'alpha', not both")
    if "expert" in raw:
        spec = raw["expert"]
        if spec is not None and not isinstance(spec, str):
            raise T2RequestError(f"'expert' must be an expert name (expert names are strings), "
                                 f"got {shown(spec)}; use 'alpha' for weights")
        _check_name_length([spec], "unknown expert")
    elif "alpha" in raw:
        spec = raw["alpha"]
        if spec is None or isinstance(spec, str):
            raise T2RequestError(f"'alpha' must be a dict {{name: weight}} or a list of weights "
                                 f"in bank order, got {shown(spec)}; use 'expert' for one "
                                 f"expert")
        check_alpha_values(spec, "alpha")
    else:
        return None
    try:
        alpha = parse_mixture(spec, names, num_layers, bounds, dtype=torch.float64)
    except MixtureError as exc:
        raise T2RequestError(str(exc)) from None
    normal = normal_form(alpha, names)
    return None if normal is None else {"alpha": normal}


def mixture_key(normal) -> str | None:
    """A stable string for a normal-form mixture (None for the base model)."""
    if normal is None:
        return None
    return json.dumps(normal["alpha"], sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# The front end's view of the bank
# --------------------------------------------------------------------------------------------
def file_digest(path) -> str:
    """Digest of an expert file's bytes (of its ``expert.safetensors`` for an expert folder)."""
    from ..experts import EXPERT_WEIGHTS

    path = Path(path)
    h = hashlib.sha256()
    with open(path / EXPERT_WEIGHTS if path.is_dir() else path, "rb") as f:
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
    """The name of the expert in a file or folder (its metadata ``name``, else the file stem).

    The whole expert is read and checked (:func:`t2fast.experts.load_expert`: format, name
    rules, finite and bounded z), so a bad file fails here with a :class:`T2FileError`.
    """
    from ..experts import load_expert

    return load_expert(path).name


class FrontEnd:
    """What the front end knows of an engine's experts: names in bank order and digests."""

    def __init__(self, num_layers: int, max_experts: int, bounds: MixtureBounds | None = None):
        self.num_layers = num_layers
        self.max_experts = max_experts
        self.bounds = bounds or MixtureBounds()
        self.names: list[str] = []
        self.digests: dict[str, str] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "FrontEnd":
        cfg: T2Config = config_from_vllm(vllm_config)
        fe = cls(num_decoder_layers(vllm_config.model_config), cfg.max_experts,
                 cfg.mixture_bounds)
        for p in cfg.experts:
            fe.add(expert_file_name(p), file_digest(p))
        return fe

    def add(self, name: str, digest: str) -> None:
        """Add an expert (a name already present is replaced: its digest changes)."""
        check_expert_name(name)
        with self.lock:
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
            return normalize_spec(raw, self.names, self.num_layers, self.bounds)

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


def check_request_keys(extra_args) -> None:
    """Refuse keys that look like t2fast's but are not read (``t2_experts``, ``t2_adapt``
    outside ``t2fast serve``), and more than one spec key: they would silently be ignored."""
    keys = [k for k in (extra_args or {}) if isinstance(k, str)]
    unknown = [k for k in keys if k.lower().replace("-", "_").startswith(REQUEST_KEY)
               and k != REQUEST_KEY and k not in FLAT_KEYS]
    if unknown:
        raise T2RequestError(f"unknown key(s) {shown_list(unknown)} in extra_args; t2fast reads "
                             f"{[REQUEST_KEY, *FLAT_KEYS]}" +
                             ("; t2_adapt is served by `t2fast serve`" if "t2_adapt" in unknown
                              else ""))
    given = [k for k in keys if k == REQUEST_KEY or k in FLAT_KEYS]
    if len(given) > 1:
        raise T2RequestError(f"give one of {given}, not several")


def _raw_spec(params):
    extra_args = getattr(params, "extra_args", None)
    check_request_keys(extra_args)
    return extract_spec(extra_args)


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
