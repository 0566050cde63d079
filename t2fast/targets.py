"""Which linear layers of a model SVF adapts.

Names are Hugging Face module names (``model.layers.3.mlp.down_proj``); expert files and
decomposition caches are keyed by them. A selection is a module set (a preset, short names or
glob patterns) and optionally a layer selection.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Sequence

from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS = {"all": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder-layer index in a module name (``model.layers.7.self_attn.q_proj`` → 7)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _module_patterns(targets) -> list[str]:
    if isinstance(targets, str):
        if targets in PRESETS:
            return list(PRESETS[targets])
        return [targets]
    pats = list(targets)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"targets must be 'all', 'attention', 'mlp', or a non-empty list of "
                         f"module names / glob patterns; got {targets!r}")
    return pats


def _layer_set(layers, num_layers: int) -> set[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        chosen = {layers}
    elif isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(v, int) for v in layers):
        chosen = set(range(*layers))
    elif isinstance(layers, str) and layers in ("first_half", "second_half"):
        half = num_layers // 2
        chosen = set(range(half)) if layers == "first_half" else set(range(half, num_layers))
    elif isinstance(layers, Iterable):
        chosen = {int(v) for v in layers}
    else:
        raise ValueError(f"layers must be None, an int, a (start, stop) tuple, a range, a list of "
                         f"ints, 'first_half' or 'second_half'; got {layers!r}")
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {num_layers} decoder "
                         f"layers (0..{num_layers - 1})")
    return chosen


def _matches(name: str, patterns: Sequence[str]) -> bool:
    short = name.rsplit(".", 1)[-1]
    return any(short == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def resolve_targets(model: nn.Module, targets="all", layers=None) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` selected by ``targets`` and ``layers``.

    Args:
        targets: ``"all"`` (q, k, v, o, gate, up, down), ``"attention"``, ``"mlp"``, a short name
            (``"down_proj"``), or a list of short names and/or glob patterns over full names
            (``"model.layers.*.mlp.*"``).
        layers: ``None`` (every layer), an int, ``(start, stop)``, a range or list of ints,
            ``"first_half"`` or ``"second_half"``.
    Returns:
        Full module names in model order. Raises ``ValueError`` if nothing matches.
    """
    patterns = _module_patterns(targets)
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    layer_ids = [layer_index(n) for n in linears]
    num_layers = 1 + max((i for i in layer_ids if i is not None), default=-1)
    chosen_layers = _layer_set(layers, num_layers)
    out = []
    for name, li in zip(linears, layer_ids):
        if not _matches(name, patterns):
            continue
        if chosen_layers is not None and li not in chosen_layers:
            continue
        out.append(name)
    if not out:
        sample = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(f"no nn.Linear module matches targets={targets!r} layers={layers!r}; "
                         f"the model's linear modules include: {sample or '(none)'}")
    return out
