"""Which linear layers of a model SVF adapts.

Names are Hugging Face module names (``model.layers.3.mlp.down_proj``); expert files and
decomposition caches are keyed by them. A selection is a module set (a preset, short names or
glob patterns) and optionally a layer selection.

**Fused projections** (Phi-3's ``qkv_proj`` and ``gate_up_proj``) stack several logical matrices
along the output dimension. They are split per logical matrix, as the vLLM path does: the
targets are ``...self_attn.q_proj``, ``.k_proj``, ``.v_proj``, ``...mlp.gate_proj``, ``.up_proj``
(row blocks of the fused weight), so experts carry the same names on every architecture.
:func:`fused_parts` gives the row blocks, :func:`target_weights` the weight of every target.
"""
from __future__ import annotations

import fnmatch
import numbers
import re
from typing import Sequence

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS = {"all": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}

#: fused projection → the logical matrices it stacks along its output dimension, in order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

#: The decoder-layer lists of Hugging Face models: ``model.layers.N`` (Llama, Mistral, Qwen2,
#: Phi-3, GPT-NeoX), ``transformer.h.N`` (GPT-2, GPT-J, Falcon, BLOOM), ``blocks.N`` (MPT).
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder-layer index in a module name (``model.layers.7.self_attn.q_proj`` → 7,
    ``transformer.h.2.attn.q_proj`` → 2)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _refuse(where: str, value, what: str):
    """Raise ``ValueError("<where> must be <what>; got <value>")``, with ``why`` set to
    ``"expected <what>"`` (for :class:`t2fast.config.SVFConfig`'s messages)."""
    err = ValueError(f"{where} must be {what}; got {value!r}")
    err.why = f"expected {what}"
    raise err


def normalize_targets(targets, where: str = "targets"):
    """A target selection, checked: a non-empty string (preset, short name or glob) as is, or a
    non-empty list of strings (a tuple becomes a list). Raises ``ValueError`` naming ``where``."""
    if isinstance(targets, str) and targets:
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(
            isinstance(t, str) and t for t in targets):
        return list(targets)
    _refuse(where, targets, f"{', '.join(map(repr, PRESETS))}, a module short name, or a "
                            f"non-empty list of module names / glob patterns")


def _module_patterns(targets) -> list[str]:
    targets = normalize_targets(targets)
    return list(PRESETS.get(targets, (targets,))) if isinstance(targets, str) else targets


HALVES = ("first_half", "second_half")
_LAYERS_HELP = ("None, an int, a (start, stop) tuple, a range, a list of ints, {'start': a, "
                "'stop': b}, 'first_half' or 'second_half'")


def _index(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def normalize_layers(layers, where: str = "layers"):
    """The one Python form of a decoder-layer selection, checked.

    ``None`` (every layer), an int, ``(start, stop)`` (a layer range, ``start < stop``), a list
    of ints (explicit layers), or ``"first_half"`` / ``"second_half"``. A ``range`` of step 1
    and the JSON form ``{"start": a, "stop": b}`` become ``(start, stop)``; other ranges, sets
    and tuples of another length become lists. Raises ``ValueError`` naming ``where``.
    """
    if isinstance(layers, dict) and set(layers) == {"start", "stop"}:
        layers = (layers["start"], layers["stop"])
    elif isinstance(layers, range):
        layers = (layers.start, layers.stop) if layers.step == 1 else list(layers)
    elif isinstance(layers, (set, frozenset)):
        layers = sorted(layers)
    elif isinstance(layers, tuple) and len(layers) != 2:
        layers = list(layers)
    if layers is None or isinstance(layers, str) and layers in HALVES:
        return layers
    if _index(layers):
        return int(layers)
    if isinstance(layers, tuple):
        if all(_index(v) for v in layers) and layers[0] < layers[1]:
            return (int(layers[0]), int(layers[1]))
        _refuse(where, layers, "a layer range (start, stop) of two ints with 0 <= start < stop")
    if isinstance(layers, list) and layers and all(_index(v) for v in layers):
        return [int(v) for v in layers]
    _refuse(where, layers, _LAYERS_HELP)


def layers_to_json(layers):
    """The JSON form of a selection in :func:`normalize_layers`'s form: a range ``(a, b)`` is
    ``{"start": a, "stop": b}`` (a list always means explicit layers); others are unchanged."""
    return {"start": layers[0], "stop": layers[1]} if isinstance(layers, tuple) else layers


def _layer_set(layers, num_layers: int) -> set[int] | None:
    layers = normalize_layers(layers)
    if layers is None:
        return None
    if isinstance(layers, int):
        chosen = {layers}
    elif isinstance(layers, tuple):
        chosen = set(range(*layers))
    elif layers in HALVES:
        half = num_layers // 2
        chosen = set(range(half)) if layers == "first_half" else set(range(half, num_layers))
    else:
        chosen = set(layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {num_layers} decoder "
                         f"layers (0..{num_layers - 1})")
    return chosen


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def fused_parts(model: nn.Module, name: str, linear: nn.Linear) -> list[tuple[str, int, int]]:
    """``[(logical name, first row, end row)]`` of the fused projection ``name`` (weight
    [out, in]); the sizes come from the model's config and must add up to ``out``."""
    parent, _, short = name.rpartition(".")
    out = linear.out_features
    cfg = _text_config(model)
    if short == "gate_up_proj":
        sizes = [out // 2, out // 2]
    else:
        heads = getattr(cfg, "num_attention_heads", None)
        if not heads:
            raise ValueError(f"cannot split the fused projection {name}: the model has no config "
                             f"with num_attention_heads")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    if sum(sizes) != out:
        raise ValueError(f"cannot split the fused projection {name} (out_features {out}) into "
                         f"{list(FUSED[short])} of sizes {sizes} from the model's config")
    parts, start = [], 0
    for logical, size in zip(FUSED[short], sizes):
        parts.append((f"{parent}.{logical}" if parent else logical, start, start + size))
        start += size
    return parts


def linear_matrices(model: nn.Module) -> list[tuple[str, str | None]]:
    """``(matrix name, fused module name or None)`` of every linear matrix, in model order."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in FUSED and layer_index(name) is not None:
            out.extend((logical, name) for logical, _, _ in fused_parts(model, name, mod))
        else:
            out.append((name, None))
    return out


def target_modules(model: nn.Module, names: Sequence[str]) -> dict:
    """The modules holding the targets ``names``, in their order: ``{module name: None}`` for a
    target that is a whole ``nn.Linear``; ``{fused module name: [(logical name, first row, end
    row)]}`` (every part, targeted or not) for logical matrices of a fused projection."""
    mods = dict(model.named_modules())
    out = {}
    for name in names:
        if isinstance(mods.get(name), nn.Linear):
            out[name] = None
            continue
        parent, _, short = name.rpartition(".")
        fused = [f"{parent}.{f}" if parent else f for f, logical in FUSED.items()
                 if short in logical]
        fused = [f for f in fused if isinstance(mods.get(f), nn.Linear)]
        if not fused:
            raise ValueError(f"target {name} is neither a linear module of the model nor part "
                             f"of a fused projection")
        if fused[0] not in out:
            out[fused[0]] = fused_parts(model, fused[0], mods[fused[0]])
    return out


def target_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weight [out, in] of every target in ``names`` (a row-block view for a logical matrix
    of a fused projection)."""
    weights = {}
    for module_name, parts in target_modules(model, names).items():
        w = model.get_submodule(module_name).weight
        if parts is None:
            weights[module_name] = w
        else:
            weights.update({logical: w[a:b] for logical, a, b in parts})
    return {n: weights[n] for n in names}


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
            ``"first_half"`` or ``"second_half"`` (:func:`normalize_layers`).
    Returns:
        Full names in model order; the logical matrices of a fused projection (``qkv_proj`` →
        ``q_proj``, ``k_proj``, ``v_proj``) in its place. A pattern that matches the fused
        module's own name selects all its parts.
    Raises:
        ValueError if nothing matches, if some of the names or patterns given match nothing
        (a preset's names need not all exist), if ``targets="all"`` leaves linear matrices of the
        selected decoder layers unadapted (an architecture whose projections t2fast cannot tell
        apart; the message lists them), or if a selected matrix of a multi-layer model sits
        outside every decoder-layer list t2fast knows (``layers.N``, ``h.N``, ``blocks.N``).
    """
    patterns = _module_patterns(targets)
    matrices = linear_matrices(model)
    if not (isinstance(targets, str) and targets in PRESETS):    # names the caller wrote
        idle = [p for p in patterns if not any(
            _matches(n, [p]) or (f is not None and _matches(f, [p])) for n, f in matrices)]
        if idle and len(idle) < len(patterns):
            raise ValueError(f"targets {idle[:4]}{' ...' if len(idle) > 4 else ''} match no "
                             f"nn.Linear module of this model (misspelled, or made for another "
                             f"model); the others match")
    linears = [n for n, _ in matrices]
    layer_ids = [layer_index(n) for n in linears]
    num_layers = 1 + max((i for i in layer_ids if i is not None), default=-1)
    chosen_layers = _layer_set(layers, num_layers)
    out, left = [], []
    for (name, fused), li in zip(matrices, layer_ids):
        if chosen_layers is not None and li not in chosen_layers:
            continue
        if _matches(name, patterns) or (fused is not None and _matches(fused, patterns)):
            out.append(name)
        elif li is not None:
            left.append(name)
    if out and left and targets == "all":
        raise ValueError(f"targets='all' adapts q, k, v, o, gate, up and down projections, but "
                         f"{len(left)} linear modules of the decoder layers are none of these "
                         f"and cannot be adapted: {left[:6]}{' ...' if len(left) > 6 else ''}; "
                         f"pass targets= (short names or glob patterns) to adapt the others")
    if not out:
        sample = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(f"no nn.Linear module matches targets={targets!r} layers={layers!r}; "
                         f"the model's linear modules include: {sample or '(none)'}")
    deep = max(num_layers, getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    unplaced = [n for n in out if layer_index(n) is None]
    if unplaced and deep > 1:
        raise ValueError(f"cannot tell which decoder layer {unplaced[:3]}"
                         f"{' ...' if len(unplaced) > 3 else ''} belong to (t2fast reads it from "
                         f"a 'layers.N', 'h.N' or 'blocks.N' module path), so per-layer mixtures "
                         f"could not address them; pass targets= naming modules of those lists")
    return out
