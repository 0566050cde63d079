"""Mixture profiles: a task's α (e.g. from few-shot CEM), saved once, served by name.

A profile file is JSON::

    {"format": "t2fast-profile", "version": 1,
     "alpha": {"arith": 0.8, "strings": 0.3},      # or per layer: {"arith": [w_0, ...]}
     "meta": {...}}                                 # free-form: task, score, seed ...

``alpha`` names the experts (never bank order, which changes as experts come and go), in the
mixture language of :mod:`t2fast.mixtures`. ``t2fast serve --profiles NAME=FILE`` loads profiles
at start-up (each checked against the loaded experts and the α bounds); a request then says
``"t2_adapt": "profile:NAME"``.
"""
from __future__ import annotations

import json
from pathlib import Path

PROFILE_FORMAT = "t2fast-profile"
PROFILE_VERSION = 1


def profile_alpha(alpha, expert_names) -> dict:
    """``{name: weight or [per-layer weights]}`` from an α in bank order ([K] or [L, K])."""
    a = alpha.tolist() if hasattr(alpha, "tolist") else list(alpha)
    names = list(expert_names)
    per_layer = bool(a) and isinstance(a[0], (list, tuple))
    rows = a if per_layer else [a]
    if any(len(r) != len(names) for r in rows):
        raise ValueError(f"alpha has {len(rows[0])} weights per layer but {len(names)} experts "
                         f"were named: {names}")
    return {n: ([float(r[k]) for r in rows] if per_layer else float(rows[0][k]))
            for k, n in enumerate(names)}


def save_profile(path, alpha, expert_names, **meta) -> Path:
    """Write a profile (``alpha`` in bank order of ``expert_names``, [K] or [L, K])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
                                "alpha": profile_alpha(alpha, expert_names), "meta": meta},
                               indent=1) + "\n")
    return path


def load_profile(path) -> dict:
    """The ``alpha`` of a profile file (``{name: weight or [per-layer weights]}``).

    Raises:
        ValueError naming the file and the problem.
    """
    return read_profile(path)[0]


def read_profile(path) -> tuple[dict, dict]:
    """(``alpha``, ``meta``) of a profile file, checked as :func:`load_profile` says."""
    where = f"profile file {str(path)!r}"
    try:
        d = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{where} is not a t2fast profile (format {PROFILE_FORMAT!r})")
    if d.get("version") != PROFILE_VERSION:
        raise ValueError(f"{where} has version {d.get('version')!r}; this t2fast reads "
                         f"version {PROFILE_VERSION}")
    if not isinstance(d.get("alpha"), dict) or not d["alpha"]:
        raise ValueError(f"{where}: 'alpha' must be a non-empty {{expert name: weight}}")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be an object")
    return d["alpha"], meta


def check_restated(meta: dict, restate: bool) -> None:
    """Refuse a profile whose α was searched on questions asked otherwise than a server with
    ``restate`` asks them: ``meta["restated"]`` (``t2fast adapt --restate``) needs a server
    that restates (``t2fast serve --restate``), any other profile one that does not.

    Raises:
        ValueError saying which.
    """
    if bool(meta.get("restated", False)) == restate:
        return
    if restate:
        raise ValueError("its α was searched on questions as asked, but this server restates "
                         "them (--restate); search it with t2fast adapt --restate")
    raise ValueError("its α was searched on restated questions (t2fast adapt --restate); serve "
                     "it with --restate")
