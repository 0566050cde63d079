"""The one mixture language of t2fast: parsing and bounding α, expert names, z ranges.

Every entry point — :meth:`t2fast.patching.SVFHandle.set_mixture`, the vLLM front end
(``extra_args["t2"]``), the CLI and the server — parses mixtures with :func:`parse_mixture`, so
they accept the same forms and give the same errors.

A **mixture** over a bank of K experts (bank order ``expert_names``) gives every adapted matrix
``z' = α_base · 1 + Σ_k α_k z_k``. A spec is one of::

    None or "base"              the base model (α_base = 1)
    "math"                      one expert (α_math = 1)
    {"math": 0.3, "code": 0.7}  weights by name; "base" may be named too
    {"math": [w_0, ..., w_L-1]} per-layer weights by name (needs ``num_layers``)
    [0.3, 0.7]                  K weights in bank order (list, tuple, tensor or array)
    [[...K...], ...L rows...]   per-layer weights [num_layers, K] in bank order

A spec is always ONE mixture: a nested list is a per-layer α, never one spec per batch row
(:meth:`~t2fast.patching.SVFHandle.set_mixture` takes per-row mixtures as ``rows=[...]``).

**Bounds** (:class:`MixtureBounds`, configurable): every weight is a finite real number — a
Python, numpy or 0-d tensor real whose float value is finite (not ``10**400``; no booleans, no
strings), ``|α_k| ≤ max_abs`` and ``Σ_k |α_k| ≤ max_l1`` (base included, per layer).
An all-zero α (``{}``, ``[0, 0]``) would zero every adapted weight; it is refused unless the spec
names ``"base"`` explicitly (``{"base": 0}``: the caller asks for it).

**Expert files** hold z vectors that must be finite with ``|z| ≤ Z_MAX`` (:func:`check_z`); z = 1
is the base model, and the official parameterization's rescaled ``sigmoid(p)`` stays well inside.

**Expert names** (:func:`check_expert_name`): letters, digits, ``-``, ``_`` and ``.``, starting
with a letter or digit, at most ``MAX_NAME_LENGTH`` characters, and not ``"base"``.

A parsed mixture is a :class:`Mixture` value: its normal form (by name, zero weights dropped),
a stable ``key``, the experts it uses, and its placement in a bank's columns. The request
vocabulary — the keys ``"t2"``, ``"t2_expert"``, ``"t2_alpha"``, ``"t2_adapt"``, the fields
``"expert"`` / ``"alpha"``, the ``"profile:"`` prefix — and the envelopes a mixture travels in
(a request's ``"t2"`` value, ``vllm_xargs``, the vLLM front end's envelope for the workers) are
defined here and nowhere else.

Errors are :class:`MixtureError` (a ``ValueError``); a value of the wrong type raises
:class:`MixtureTypeError`, which is both a ``MixtureError`` and a ``TypeError``. Messages repeat
at most about ``MAX_SHOWN`` characters of any value given
(:func:`t2fast.messages.shown`).
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass

import torch

from .messages import shown, shown_list

BASE = "base"
Z_MAX = 8.0
MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_finite_real(v: numbers.Real) -> bool:
    """Whether the real ``v`` is a finite float (10**400 and Fraction(10**400, 3) are not)."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


class MixtureError(ValueError):
    """A mixture spec is invalid (unknown expert, out-of-bounds or non-finite weight ...)."""


class MixtureTypeError(MixtureError, TypeError):
    """A mixture spec holds a value of the wrong type (a boolean or string as a weight ...)."""


@dataclass(frozen=True)
class MixtureBounds:
    """Limits on a mixture's weights: ``|α_k| ≤ max_abs`` and ``Σ_k |α_k| ≤ max_l1`` per layer.

    The defaults allow any convex or moderately extrapolating mixture (the paper's CEM search
    stays within ``[-1, 2]`` per expert) while refusing weights that make answers degenerate.
    """
    max_abs: float = 4.0
    max_l1: float = 8.0

    def __post_init__(self):
        for field in ("max_abs", "max_l1"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
                    not (is_finite_real(v) and v > 0):
                raise ValueError(f"MixtureBounds.{field} must be a finite number > 0, got "
                                 f"{shown(v)}")


DEFAULT_BOUNDS = MixtureBounds()


def check_expert_name(name, where: str = "expert name") -> str:
    """Return ``name`` if it is a valid expert name (see the module docstring), else raise."""
    if not isinstance(name, str):
        raise MixtureTypeError(f"{where} must be a string, got {shown(name)}")
    if name == BASE:
        raise MixtureError(f"{where} may not be {BASE!r} (reserved for the base model)")
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise MixtureError(f"{where} {shown(name)} is not valid: use at most {MAX_NAME_LENGTH} "
                           f"letters, digits, '-', '_' or '.', starting with a letter or digit")
    return name


def check_z(name: str, z, bound: float = Z_MAX, where: str = "expert") -> None:
    """Raise :class:`t2fast.safetensors_io.T2FileError` unless ``z`` is a finite 1-D float
    tensor with ``|z| ≤ bound``; the message names ``where``, the matrix ``name`` and the bound."""
    from .safetensors_io import T2FileError

    if not isinstance(z, torch.Tensor) or z.dim() != 1 or not z.is_floating_point():
        raise T2FileError(f"{where}: z for {name} must be a 1-D float tensor, got "
                          f"{getattr(z, 'shape', type(z).__name__)}")
    if not bool(torch.isfinite(z).all()):
        raise T2FileError(f"{where}: z for {name} contains NaN or Inf")
    worst = float(z.abs().max()) if z.numel() else 0.0
    if worst > bound:
        raise T2FileError(f"{where}: z for {name} reaches |z| = {worst:.6g}, outside the allowed "
                          f"range [-{bound:g}, {bound:g}] (z = 1 is the base model)")


def _number(v, what: str) -> float:
    """A weight as a finite float: Python, numpy and 0-d tensor reals (no booleans)."""
    v = _as_list(v)                             # numpy scalars, 0-d arrays and tensors
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise MixtureTypeError(f"{what} must be a number, got {shown(v)} ({type(v).__name__})")
    if not is_finite_real(v):
        raise MixtureError(f"{what} must be finite, got {shown(v)}")
    return float(v)


def _as_list(v):
    """Tensors and arrays as (nested) Python lists; other values unchanged."""
    if isinstance(v, torch.Tensor) or (hasattr(v, "tolist") and hasattr(v, "shape")):
        return v.tolist()       # a 0-d tensor / array or a numpy scalar gives a Python number
    return v


def _weights(v, what: str, num_layers: int | None) -> list[float]:
    """A weight as ``num_layers`` floats (a scalar repeats; a list is per layer)."""
    v = _as_list(v)
    if isinstance(v, (list, tuple)):
        if num_layers is None:
            raise MixtureError(f"{what} is a list of {len(v)} per-layer weights, but per-layer "
                               f"mixtures are not available here (no layer count)")
        if len(v) != num_layers:
            raise MixtureError(f"{what} is a per-layer list of {len(v)} weights; the model has "
                               f"{num_layers} decoder layers")
        return [_number(x, f"{what}[{i}]") for i, x in enumerate(v)]
    return [_number(v, what)] * (num_layers or 1)


def _column(name, names: list[str], what: str) -> int:
    if not isinstance(name, str):
        raise MixtureTypeError(f"{what}: expert names must be strings, got {shown(name)}")
    if name == BASE:
        return 0
    try:
        return 1 + names.index(name)
    except ValueError:
        loaded = f"{names[:8]}" + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise MixtureError(f"unknown expert {shown(name)}; loaded experts: "
                           f"{loaded if names else '(none)'} (or {BASE!r})") from None


def parse_mixture(spec, expert_names, num_layers: int | None = None,
                  bounds: MixtureBounds | None = None, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Parse and bound a mixture spec (forms in the module docstring).

    Args:
        spec: the mixture (a :class:`Mixture` is read through its normal form, checked again
            against these names and bounds).
        expert_names: the bank's experts in bank order (K names, without ``"base"``).
        num_layers: decoder layers of the model; ``None`` refuses per-layer specs.
        bounds: :class:`MixtureBounds` (default ``MixtureBounds()``: 4 and 8).
        dtype: of the result (``torch.float64`` keeps the given numbers exactly, as
            :func:`normal_form` wants them).
    Returns:
        α (float32 by default) of shape ``[K + 1]`` (``num_layers`` None) or
        ``[num_layers, K + 1]``; column 0 is the base (z = 1), column k the expert
        ``expert_names[k - 1]``.
    Raises:
        MixtureTypeError (a TypeError and ValueError) for values of the wrong type;
        MixtureError (a ValueError) for unknown names, wrong lengths, non-finite weights,
        weights beyond the bounds and all-zero mixtures — naming the value and the bound.
    """
    names = list(expert_names)
    bounds = DEFAULT_BOUNDS if bounds is None else bounds
    if not isinstance(bounds, MixtureBounds):
        raise TypeError(f"bounds must be a MixtureBounds or None, got {type(bounds).__name__}")
    if num_layers is not None and (isinstance(num_layers, bool) or
                                   not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be an integer >= 1 or None, got {num_layers!r}")
    L, K = num_layers or 1, len(names)
    alpha = torch.zeros(L, K + 1, dtype=torch.float64)
    names_base = False
    spec = spec.normal if isinstance(spec, Mixture) else _as_list(spec)
    if spec is None:
        alpha[:, 0] = 1.0
        names_base = True
    elif isinstance(spec, str):
        alpha[:, _column(spec, names, "mixture")] = 1.0
        names_base = spec == BASE
    elif isinstance(spec, dict):
        for name, w in spec.items():
            col = _column(name, names, "mixture")
            alpha[:, col] = torch.tensor(_weights(w, f"alpha[{name!r}]", num_layers),
                                         dtype=torch.float64)
            names_base |= col == 0
    elif isinstance(spec, (list, tuple)):
        if spec and all(isinstance(_as_list(r), (list, tuple)) for r in spec):
            rows = [_as_list(r) for r in spec]
            if num_layers is None:
                raise MixtureError(f"alpha is a per-layer list of {len(rows)} rows, but "
                                   f"per-layer mixtures are not available here (no layer count)")
            if len(rows) != num_layers or any(len(r) != K for r in rows):
                raise MixtureError(
                    f"per-layer alpha must have shape ({num_layers}, {K}) (decoder layers × "
                    f"experts in bank order {names}), got {len(rows)} rows of lengths "
                    f"{sorted({len(r) for r in rows})}")
            for i, r in enumerate(rows):
                for k, w in enumerate(r):
                    alpha[i, 1 + k] = _number(w, f"alpha[{i}][{k}]")
        else:
            if len(spec) != K:
                raise MixtureError(
                    f"alpha has {len(spec)} weights; expected {K}, one per loaded expert in bank "
                    f"order {names}" + (" (no experts are loaded)" if not K else ""))
            for k, w in enumerate(spec):
                alpha[:, 1 + k] = _number(w, f"alpha[{k}]")
    else:
        raise MixtureTypeError(
            f"a mixture must be None, 'base', an expert name, a dict {{name: weight}} or a list "
            f"of {K} weights in bank order, got {type(spec).__name__} {shown(spec)}")
    _check_bounds(alpha, names, bounds, names_base)
    out = alpha.to(dtype)
    return out if num_layers is not None else out[0]


def _check_bounds(alpha: torch.Tensor, names: list[str], bounds: MixtureBounds,
                  names_base: bool) -> None:
    """alpha: float64 [L, K + 1]."""
    cols = [BASE] + names
    i, k = divmod(int(alpha.abs().argmax()), alpha.shape[1])
    if abs(float(alpha[i, k])) > bounds.max_abs:
        raise MixtureError(f"alpha[{cols[k]!r}] = {float(alpha[i, k]):.6g} is outside the bound "
                           f"|α| ≤ {bounds.max_abs:g} (MixtureBounds.max_abs)")
    per_layer = not bool((alpha == alpha[0]).all())
    l1 = alpha.abs().sum(dim=1)
    i = int(l1.argmax())
    if float(l1[i]) > bounds.max_l1:
        where = f" (layer {i})" if per_layer else ""
        raise MixtureError(f"Σ|α| = {float(l1[i]):.6g}{where} is outside the bound Σ|α| ≤ "
                           f"{bounds.max_l1:g} (MixtureBounds.max_l1)")
    if not names_base and bool((l1 == 0).any()):
        where = f" in layer {int((l1 == 0).nonzero()[0])}" if per_layer else ""
        raise MixtureError(f"the mixture is all zero{where}, which would zero every adapted "
                           f"weight; use 'base' (or None) for the base model, or name 'base' "
                           f"explicitly (e.g. {{'base': 0}}) to ask for zero weights")


def normal_form(alpha: torch.Tensor, expert_names) -> dict | None:
    """A canonical JSON-able form of a parsed α [num_layers, K + 1] (or [K + 1]), best parsed
    with ``dtype=torch.float64`` so that the weights keep their given values.

    ``None`` for the base model, else ``{name: weight or [per-layer weights]}`` sorted by name,
    zero weights dropped (``"base": 0.0`` kept where some layer is all zero, which only naming
    ``base`` allows: ``{"base": 0.0}`` for the all-zero mixture).
    Parsing the normal form gives the same α back.
    """
    a = alpha if alpha.dim() == 2 else alpha[None]
    cols = [BASE] + list(expert_names)
    out = {}
    for k, name in enumerate(cols):
        ws = [float(w) for w in a[:, k].tolist()]
        if all(w == 0.0 for w in ws):
            continue
        out[name] = ws[0] if all(w == ws[0] for w in ws) else ws
    if BASE not in out and bool((a == 0).all(dim=1).any()):
        out[BASE] = 0.0     # all-zero layers are asked for by naming 'base' (see parse)
    if out == {BASE: 1.0}:
        return None
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# One mixture as a value
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mixture:
    """One parsed and bounded mixture, by expert name: what every entry point hands on.

    ``Mixture()`` is the base model. Build one with :meth:`parse` (any spec form, against a
    bank's names), :meth:`from_request` (a request's ``"t2"`` value) or :meth:`from_envelope`
    (what the vLLM front end wrote for the workers). Equal mixtures compare and hash equal.

    Attributes:
        weights: the normal form's items sorted by name: ``(name, weight)`` or ``(name,
            (per-layer weights))``, floats; empty for the base model.
    """
    weights: tuple = ()

    @classmethod
    def parse(cls, spec, expert_names, num_layers: int | None = None,
              bounds: MixtureBounds | None = None) -> "Mixture":
        """Parse and bound ``spec`` (any form of the module docstring, or a Mixture) against
        the bank's ``expert_names`` (bank order). Raises what :func:`parse_mixture` raises."""
        names = list(expert_names)
        alpha = parse_mixture(spec, names, num_layers, bounds, dtype=torch.float64)
        normal = normal_form(alpha, names)
        if normal is None:
            return cls()
        return cls(tuple((n, tuple(w) if isinstance(w, list) else w) for n, w in normal.items()))

    @property
    def is_base(self) -> bool:
        return not self.weights

    @property
    def normal(self) -> dict | None:
        """The normal form (:func:`normal_form`): ``None`` for the base model, else
        ``{name: weight or [per-layer weights]}`` sorted by name (JSON-able)."""
        if self.is_base:
            return None
        return {n: list(w) if isinstance(w, tuple) else w for n, w in self.weights}

    @property
    def key(self) -> str | None:
        """A stable string of the mixture (None for the base model): the prefix-cache salt's
        and the ``x-t2-mixture`` header's text."""
        if self.is_base:
            return None
        return json.dumps(self.normal, sort_keys=True, separators=(",", ":"))

    @property
    def names(self) -> tuple[str, ...]:
        """The experts the mixture uses (``"base"`` is not one)."""
        return tuple(n for n, _ in self.weights if n != BASE)

    def place(self, column_of, num_layers: int, width: int) -> tuple[torch.Tensor, list[str]]:
        """α float32 [num_layers, width] in bank columns.

        Args:
            column_of: ``{expert name: column}`` of the bank (columns 1 .. width - 1);
                ``"base"`` is column 0.
            num_layers, width: the shape of the result.
        Returns:
            ``(α, missing)``: each named weight in its column, zero elsewhere, and the names
            that ``column_of`` lacks (they contribute nothing; the caller says so).
        """
        alpha = torch.zeros(num_layers, width, dtype=torch.float32)
        if self.is_base:
            alpha[:, 0] = 1.0
            return alpha, []
        missing = []
        for name, w in self.weights:
            col = 0 if name == BASE else column_of.get(name)
            if col is None:
                missing.append(name)
            else:
                alpha[:, col] = torch.as_tensor(w, dtype=torch.float32)
        return alpha, missing

    # ---- the request envelopes ----------------------------------------------------------
    @classmethod
    def from_request(cls, raw, expert_names, num_layers: int | None = None,
                     bounds: MixtureBounds | None = None) -> "Mixture":
        """The mixture of a request's ``"t2"`` value: ``{"expert": name}``, ``{"alpha": spec}``,
        a bare expert name, or a JSON string of either (``None`` or ``{}``: the base model).

        Raises:
            MixtureError naming the problem (the envelope's, or :meth:`parse`'s).
        """
        return cls.parse(_unwrap_request(raw), expert_names, num_layers, bounds)

    def envelope(self) -> dict | None:
        """What the vLLM front end writes into ``extra_args["t2"]`` for the workers
        (:meth:`from_envelope` reads it); None for the base model (the key is dropped)."""
        if self.is_base:
            return None
        return {ALPHA_FIELD: self.normal, VERSION_FIELD: ENVELOPE_VERSION}

    @classmethod
    def from_envelope(cls, value, num_layers: int,
                      bounds: MixtureBounds | None = None) -> "Mixture":
        """Read :meth:`envelope` back, trusting nothing: anything but ``{"alpha": {name:
        weight or [num_layers weights]}, "v": ENVELOPE_VERSION}`` is refused, and the weights
        are checked against ``bounds`` again (a cheap check of the one normal form, so a
        value that did not come from the front end can never place unbounded weights).
        Names need not be in any bank (:meth:`place` reports those missing).

        Raises:
            MixtureError naming the problem.
        """
        if not isinstance(value, dict) or set(value) != {ALPHA_FIELD, VERSION_FIELD} or \
                not isinstance(value[ALPHA_FIELD], dict) or not value[ALPHA_FIELD]:
            raise MixtureError(f"is not a mixture checked by the front end ({{{ALPHA_FIELD!r}: "
                               f"{{name: weight}}, {VERSION_FIELD!r}: {ENVELOPE_VERSION}}}), "
                               f"got {shown(value)}")
        if value[VERSION_FIELD] != ENVELOPE_VERSION:
            raise MixtureError(f"has envelope version {shown(value[VERSION_FIELD])}; this "
                               f"t2fast reads version {ENVELOPE_VERSION}")
        normal = value[ALPHA_FIELD]
        names = [check_expert_name(n) for n in normal if n != BASE]
        return cls.parse(normal, names, num_layers, bounds)


# --------------------------------------------------------------------------------------------
# The request vocabulary: vLLM's extra_args, the OpenAI server's vllm_xargs and HTTP bodies
# --------------------------------------------------------------------------------------------
#: ``extra_args["t2"]`` (and a request body's ``"t2"``): ``{"expert": ...}`` / ``{"alpha": ...}``.
REQUEST_KEY = "t2"
EXPERT_FIELD = "expert"
ALPHA_FIELD = "alpha"
SPEC_FIELDS = (EXPERT_FIELD, ALPHA_FIELD)
#: Flat keys -> the field they stand for (``vllm_xargs`` holds only strings, numbers and flat
#: lists, so ``{"t2_alpha": [0.3, 0.7]}`` works there).
FLAT_KEYS = {"t2_expert": EXPERT_FIELD, "t2_alpha": ALPHA_FIELD}
#: ``t2fast serve``'s two-pass adaptation per request.
ADAPT_FIELD = "adapt"
ADAPT_KEY = "t2_adapt"
#: ``"t2_adapt": "profile:NAME"`` serves a saved α (:mod:`t2fast.serve.profiles`).
PROFILE_PREFIX = "profile:"
#: The front end's envelope for the workers: ``{"alpha": normal form, "v": 1}``.
VERSION_FIELD = "v"
ENVELOPE_VERSION = 1
#: The deepest an α nests: ``{"math": [per-layer weights]}`` or ``[[per-layer row], ...]``.
MAX_ALPHA_DEPTH = 2


def looks_like_request_key(key) -> bool:
    """Whether ``key`` looks like one of t2fast's request keys (``t2...``, any case, ``-`` or
    ``_``): such keys are read or refused, never silently ignored."""
    return isinstance(key, str) and key.lower().replace("-", "_").startswith(REQUEST_KEY)


def request_spec(key: str, value):
    """The raw spec of one request key: ``"t2"``'s value as is; a flat key's as
    ``{field: value}``."""
    return value if key == REQUEST_KEY else {FLAT_KEYS[key]: value}


def extract_spec(extra_args) -> tuple[bool, object]:
    """``(present, raw spec)`` from a request's ``extra_args``: ``extra_args["t2"]``, or the
    flat keys ``t2_expert`` / ``t2_alpha``."""
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
    outside ``t2fast serve``, a spec's own ``expert`` / ``alpha`` outside its ``"t2"`` key),
    and more than one spec key: they would silently be ignored.

    Raises:
        MixtureError naming the keys.
    """
    keys = [k for k in (extra_args or {}) if isinstance(k, str)]
    unknown = [k for k in keys if looks_like_request_key(k) and k != REQUEST_KEY
               and k not in FLAT_KEYS]
    if unknown:
        raise MixtureError(f"unknown key(s) {shown_list(unknown)} in extra_args; t2fast reads "
                           f"{[REQUEST_KEY, *FLAT_KEYS]}" +
                           (f"; {ADAPT_KEY} is served by `t2fast serve`" if ADAPT_KEY in unknown
                            else ""))
    bare = [k for k in keys if k in SPEC_FIELDS]
    if bare:
        raise MixtureError(f"extra_args key {bare[0]!r} is read only inside "
                           f"{REQUEST_KEY!r}: give {{{REQUEST_KEY!r}: {{{bare[0]!r}: ...}}}} or "
                           f"{{'{REQUEST_KEY}_{bare[0]}': ...}}")
    given = [k for k in keys if k == REQUEST_KEY or k in FLAT_KEYS]
    if len(given) > 1:
        raise MixtureError(f"give one of {given}, not several")


def profile_name(value) -> str | None:
    """NAME of an adapt mode ``"profile:NAME"`` (NAME not empty), else None."""
    if isinstance(value, str) and value.startswith(PROFILE_PREFIX) and \
            len(value) > len(PROFILE_PREFIX):
        return value[len(PROFILE_PREFIX):]
    return None


def xargs_value(spec) -> str:
    """A raw spec as ``vllm_xargs["t2"]`` carries it: a JSON string (a string stays as is)."""
    return spec if isinstance(spec, str) else json.dumps(spec)


def check_alpha_values(alpha, where: str) -> None:
    """Refuse an α nested deeper than :data:`MAX_ALPHA_DEPTH` or holding an integer too large
    for a float, naming the offending entry (walked without recursion).

    Raises:
        MixtureError.
    """
    stack = [(alpha, where, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_ALPHA_DEPTH:
                raise MixtureError(f"{path} is nested too deep: an α nests at most "
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
                raise MixtureError(f"{path} is an integer too large for a float "
                                   f"({len(str(abs(value)))} digits)") from None


def _check_name_length(names, what: str) -> None:
    """Refuse names too long to be an expert's before any text quotes them in full."""
    long = next((n for n in names if isinstance(n, str) and len(n) > MAX_NAME_LENGTH), None)
    if long is not None:
        raise MixtureError(f"{what} {shown(long)}: expert names have at most "
                           f"{MAX_NAME_LENGTH} characters")


def _unwrap_request(raw):
    """The mixture spec inside a request's ``"t2"`` value (see :meth:`Mixture.from_request`)."""
    if raw is None:
        return None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except RecursionError:
            raise MixtureError("is a JSON string nested too deep") from None
        except ValueError as exc:
            raise MixtureError(f"is a string that is not valid JSON ({exc})") from None
    if isinstance(raw, str):
        raw = {EXPERT_FIELD: raw}
    if not isinstance(raw, dict):
        raise MixtureTypeError(f"must be a dict such as {{'expert': 'math'}} or "
                               f"{{'alpha': {{'math': 0.5, 'code': 0.5}}}}, got {shown(raw)}")
    unknown = sorted(set(raw) - set(SPEC_FIELDS) - {VERSION_FIELD}, key=str)
    if unknown:
        raise MixtureError(f"unknown key(s) {shown_list(unknown)}; use 'expert' or 'alpha'")
    if EXPERT_FIELD in raw and ALPHA_FIELD in raw:
        raise MixtureError("give either 'expert' or 'alpha', not both")
    if VERSION_FIELD in raw and (ALPHA_FIELD not in raw or type(raw[VERSION_FIELD]) is not int
                                 or raw[VERSION_FIELD] != ENVELOPE_VERSION):
        # accepted only as the front end writes it (a reused SamplingParams is read again)
        raise MixtureError(f"'{VERSION_FIELD}' is the version of the front end's envelope "
                           f"({{'{ALPHA_FIELD}': ..., '{VERSION_FIELD}': {ENVELOPE_VERSION}}}); "
                           f"got {shown(raw[VERSION_FIELD])}"
                           + ("" if ALPHA_FIELD in raw else " without 'alpha'"))
    if EXPERT_FIELD in raw:
        spec = raw[EXPERT_FIELD]
        if spec is not None and not isinstance(spec, str):
            raise MixtureTypeError(f"'expert' must be an expert name (expert names are "
                                   f"strings), got {shown(spec)}; use 'alpha' for weights")
        _check_name_length([spec], "unknown expert")
        return spec
    if ALPHA_FIELD in raw:
        spec = raw[ALPHA_FIELD]
        if spec is None or isinstance(spec, str):
            raise MixtureTypeError(f"'alpha' must be a dict {{name: weight}} or a list of "
                                   f"weights in bank order, got {shown(spec)}; use 'expert' for "
                                   f"one expert")
        check_alpha_values(spec, ALPHA_FIELD)
        return spec
    return None
