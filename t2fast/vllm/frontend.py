"""The vLLM front end of t2fast: each request's mixture (``SamplingParams.extra_args["t2"]``)
parsed and checked once, the envelope the workers read, and the prefix-cache salt per mixture.

A request names its mixture with one of::

    extra_args={"t2": {"expert": "math"}}                      # one expert ("base" = no expert)
    extra_args={"t2": {"alpha": {"math": 0.3, "code": 0.7}}}   # α by name (may include "base")
    extra_args={"t2": {"alpha": [0.3, 0.7]}}                   # α in bank order
    extra_args={"t2": {"alpha": [[...K...], ...L...]}}         # per-layer α, bank order
    extra_args={"t2": {"alpha": {"math": [...L...]}}}          # per-layer α by name
    extra_args={"t2": "math"}                                  # shorthand for {"expert": ...}
    extra_args={"t2_expert": "math"} / {"t2_alpha": [0.3, 0.7]}  # flat (OpenAI ``vllm_xargs``)

No ``"t2"`` key (or ``{}``) is the base model. ``z' = α_base·1 + Σ_k α_k z_k`` per adapted matrix.
The keys and envelopes are :mod:`t2fast.mixtures`' vocabulary.

The mixture inside the envelope is the language of :mod:`t2fast.mixtures` (the one
``SVFHandle.set_mixture`` speaks). The front end (the process that owns the engine's
``InputProcessor``) rejects unknown experts, wrong lengths, non-numbers, NaN/Inf, weights beyond
the bounds (``T2Config.max_alpha_abs`` / ``max_alpha_l1``) and all-zero α with
:class:`T2RequestError` (a ``ValueError`` and a vLLM validation error, i.e. HTTP 400 in
``vllm serve``) before the request reaches the engine. It then replaces the request's keys by
the :class:`~t2fast.mixtures.Mixture`'s envelope (``{"alpha": normal form, "v": 1}``), the only
value a worker places (:func:`worker_mixture`: anything else, e.g. a request that skipped the
front end, is served with the base model), and salts the request's prefix-cache key with a
digest of the mixture (and of the experts' contents), so KV blocks are never shared between
different mixtures.
"""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path

from ..messages import cap_text
from ..mixtures import FLAT_KEYS, REQUEST_KEY, Mixture, MixtureBounds, MixtureError, \
    check_expert_name, check_request_keys, extract_spec
from ..runtime import check_bank_load
from .config import T2Config, config_from_vllm, is_t2_model_config, num_decoder_layers

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


@contextmanager
def request_errors():
    """Raise a :class:`t2fast.mixtures.MixtureError` of the block as a :class:`T2RequestError`
    (same text)."""
    try:
        yield
    except MixtureError as exc:
        raise T2RequestError(str(exc)) from None


def parse_request(raw, names, num_layers: int, bounds: MixtureBounds | None = None) -> Mixture:
    """The mixture of a request's ``extra_args["t2"]`` (:meth:`t2fast.mixtures.Mixture.
    from_request`: the envelope is unwrapped, the mixture parsed and bounded by
    :func:`t2fast.mixtures.parse_mixture`, the parser ``SVFHandle.set_mixture`` uses too).

    Args:
        raw: the value of ``extra_args["t2"]`` (see the module docstring).
        names: the loaded experts' names, in bank order.
        num_layers: decoder layers of the model (for per-layer α).
        bounds: :class:`t2fast.mixtures.MixtureBounds` (default ``MixtureBounds()``).
    Raises:
        T2RequestError naming the problem.
    """
    with request_errors():
        return Mixture.from_request(raw, names, num_layers, bounds)


def worker_mixture(raw, num_layers: int, bounds: MixtureBounds | None = None) -> Mixture:
    """The mixture a worker serves for a request's ``extra_args["t2"]``: only what this front
    end wrote (:meth:`t2fast.mixtures.Mixture.from_envelope`, its weights bounded again), never
    a raw spec that skipped the front end.

    Raises:
        T2RequestError naming the problem (the worker serves such a request with the base
        model).
    """
    with request_errors():
        return Mixture.from_envelope(raw, num_layers, bounds)


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

    def check_load(self, names, replace: bool, hint: str = "pass replace=True") -> None:
        """Raise ``ValueError`` unless the experts ``names`` may be loaded
        (:func:`t2fast.runtime.check_bank_load`, the workers' own check)."""
        check_bank_load(self.names, list(names), self.max_experts, replace, hint)

    def add(self, name: str, digest: str) -> None:
        """Add an expert (a name already present is replaced: its digest changes)."""
        check_expert_name(name)
        with self.lock:
            if name not in self.names:
                self.check_load([name], replace=True)
                self.names.append(name)
            self.digests[name] = digest

    def remove(self, name: str) -> None:
        with self.lock:
            if name in self.names:
                self.names.remove(name)
            self.digests.pop(name, None)

    def parse(self, raw) -> Mixture:
        """The mixture of a request's ``extra_args["t2"]`` against the current bank (raises
        :class:`T2RequestError`)."""
        with self.lock:
            return parse_request(raw, self.names, self.num_layers, self.bounds)

    def salt(self, mixture: Mixture) -> str | None:
        """Prefix-cache salt of a mixture (None for the base model): its key and the digests
        of the experts it uses."""
        if mixture.is_base:
            return None
        with self.lock:
            digests = {n: self.digests.get(n, "") for n in mixture.names}
        h = hashlib.sha256(mixture.key.encode())
        h.update(json.dumps(digests, sort_keys=True).encode())
        return "t2fast-" + h.hexdigest()[:32]


def combine_salt(user_salt: str | None, t2_salt: str | None) -> str | None:
    """A request's prefix-cache salt: None for a base request without a salt of its own (the
    base model's blocks are shared), else a digest of the pair. No salt a client sends can
    therefore equal a mixture's (a base request salted ``t2fast-...`` would have stored base
    KV under that mixture's salt, and the other way round)."""
    if not user_salt and t2_salt is None:
        return None
    pair = json.dumps([user_salt or None, t2_salt]).encode()
    return "t2fast-" + hashlib.sha256(pair).hexdigest()[:32]


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


def request_spec_of(params) -> tuple[bool, object]:
    """``(present, raw spec)`` of a request's ``SamplingParams`` (its keys checked:
    :func:`t2fast.mixtures.check_request_keys`); raises :class:`T2RequestError`."""
    extra_args = getattr(params, "extra_args", None)
    with request_errors():
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
        present, raw = request_spec_of(params)
        mixture = fe.parse(raw) if present else Mixture()   # raises T2RequestError
        request = orig(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(request, "sampling_params", None)
        if sp is not None and present:
            extra = {k: v for k, v in (sp.extra_args or {}).items() if k not in FLAT_KEYS}
            if mixture.is_base:
                extra.pop(REQUEST_KEY, None)
            else:
                extra[REQUEST_KEY] = mixture.envelope()
            sp.extra_args = extra or None
        request.cache_salt = combine_salt(request.cache_salt, fe.salt(mixture))
        return request

    process_inputs._t2fast_hook = True
    process_inputs.__wrapped__ = orig
    process_inputs.__doc__ = orig.__doc__
    InputProcessor.process_inputs = process_inputs
