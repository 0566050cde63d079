"""Import SVF experts trained with the official Transformer² code (SakanaAI/self-adaptive-llms).

The official code adapts every ``state_dict()`` entry of the base model whose key contains
``"mlp"`` (per layer: ``gate_proj``, ``up_proj``, ``down_proj``) and writes three kinds of
checkpoint with ``torch.save``; :func:`read_official` tells them apart by their keys:

``policy``
    ``policy_params.pt`` of an SVF policy (its ``state_dict()``): one raw, pre-sigmoid vector
    ``p`` (bf16, length ``min(m, n)``) per adapted matrix under
    ``learnable_params_module_list.{i}``, in the order of the model's ``"mlp"`` keys.
``legacy``
    ``learnable_params.pt`` (the ``save_legacy_params`` option): the same vectors in a dict
    keyed by the parameter's name (``model.layers.0.mlp.gate_proj.weight`` ...).
``weighted-combination``
    ``policy_params.pt`` of a weighted-combination policy (what the official few-shot CEM
    searches): ``adaptive_weights`` [K, 1] (one coefficient per expert) or [K, M] (one per
    expert and matrix, ``per_layer=true``) and the K experts' raw vectors as buffers
    ``weights_{k}_k_{name with '.' -> '_'}``.

For a policy or legacy file the official code applies::

    mask = sigmoid(p).to(bfloat16) * max_mult
    W'   = U diag(σ ⊙ mask) Vᵀ · Σσ / Σ(σ ⊙ mask)

A weighted combination mixes the experts' **raw** vectors and applies no sigmoid at all (its
``get_mask`` is the identity): ``c = adaptive_weights`` (divided by its sum over the experts
when the run had ``norm_coeffs=true``, a setting the file does not record),
``mask = Σ_k c[k] · p_k``, then the same ``W'``. t2fast reproduces that ``W'``: it writes ONE
expert holding the combination the official code evaluates (not the K experts and an α, since
t2fast mixes z = Σ α_k z_k after the sigmoid, which is another model).

The nuclear-norm rescale is a per-matrix scalar, so it folds into z: the t2fast expert holds
``z = mask · Σσ / Σ(σ ⊙ mask)`` and gives the same ``W'`` (``U diag(σ ⊙ z) Vᵀ``).

    t2fast import-official policy_params.pt --model DIR --out expert.safetensors
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .decompose import decompose_weights
from .experts import Expert, Fingerprint
from .safetensors_io import T2FileError
from .targets import FUSED, target_weights

POLICY_KEY = re.compile(r"learnable_params_module_list\.(\d+)")
WCOMB_KEY = re.compile(r"weights_(\d+)_k_(\w+)")
WCOMB_ALPHA = "adaptive_weights"
#: Checkpoint file names whose expert is named after the folder (a run's log folder).
RUN_FILES = ("policy_params", "policy_params_latest", "learnable_params",
             "learnable_params_latest")
#: The most characters of torch's own error text an error message quotes.
MAX_DETAIL = 200


@dataclass
class OfficialCheckpoint:
    """The contents of an official checkpoint (see the module docstring).

    kind: ``"policy"``, ``"legacy"`` or ``"weighted-combination"``.
    vectors: policy: ``{index: p}``; legacy: ``{parameter name: p}``; weighted combination:
        ``{(expert index, name with '_' for '.'): p}`` (1-D float tensors).
    alpha: weighted combination only: ``adaptive_weights`` [K, 1] or [K, M].
    """
    kind: str
    vectors: dict
    alpha: torch.Tensor | None = None


def official_targets(model: nn.Module) -> list[str]:
    """The matrices an official checkpoint adapts, in its order: the ``state_dict()`` keys of
    ``model`` containing ``"mlp"``, without ``.weight``. Raises if one is not a 2-D weight."""
    names = []
    for key, v in model.state_dict().items():
        if "mlp" not in key:
            continue
        if not key.endswith(".weight") or v.dim() != 2:
            raise ValueError(f"the official code adapts every state_dict entry containing "
                             f"'mlp', but {key} (shape {tuple(v.shape)}) is not a 2-D weight; "
                             f"t2fast cannot import experts for this model")
        name = key[:-len(".weight")]
        if name.rsplit(".", 1)[-1] in FUSED:
            raise ValueError(f"the official code adapts the fused projection {name} as one "
                             f"matrix, while t2fast adapts its logical parts "
                             f"{list(FUSED[name.rsplit('.', 1)[-1]])}: its experts for this "
                             f"model cannot be imported")
        names.append(name)
    if not names:
        raise ValueError("the model has no state_dict entries containing 'mlp'")
    return names


def _load(path: Path, where: str) -> dict:
    """``torch.load(weights_only=True)`` of a non-empty dict, errors in t2fast's words."""
    if not path.is_file():
        raise T2FileError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        text = str(exc)
        m = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        detail = (m.group(1).split(". ")[0] if m else
                  (text.strip().splitlines() or [type(exc).__name__])[0])
        raise T2FileError(f"{where} is not a checkpoint of tensors that t2fast can read "
                          f"safely (torch.load with weights_only=True: "
                          f"{detail[:MAX_DETAIL]})") from None
    if not isinstance(state, dict) or not state:
        raise T2FileError(f"{where} is not a state dict (got {type(state).__name__})")
    return state


def _vector(v, key: str, where: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        raise T2FileError(f"{where}: {key} must be a 1-D float tensor, got "
                          f"{getattr(v, 'shape', type(v).__name__)}")
    if not bool(torch.isfinite(v).all()):
        raise T2FileError(f"{where}: {key} contains NaN or Inf")
    return v.detach()


def read_official(path) -> OfficialCheckpoint:
    """The vectors of an official checkpoint of any of the three kinds (read with
    ``weights_only=True``: nothing in the file is executed). Raises :class:`T2FileError`
    naming the file and the problem."""
    path = Path(path)
    where = f"official checkpoint {str(path)!r}"
    state = _load(path, where)
    keys = [str(k) for k in state]
    if any(POLICY_KEY.fullmatch(k) for k in keys):
        kind = "policy"
    elif WCOMB_ALPHA in state:
        kind = "weighted-combination"
    elif all(k.endswith(".weight") and "mlp" in k for k in keys):
        kind = "legacy"
    else:
        odd = next(k for k in keys if not (k.endswith(".weight") and "mlp" in k))
        raise T2FileError(f"{where}: unexpected key {odd!r}; the official formats hold "
                          f"learnable_params_module_list.0, .1, ... (policy_params.pt), "
                          f"adaptive_weights and weights_K_k_NAME (a weighted combination), or "
                          f"MLP parameter names such as model.layers.0.mlp.gate_proj.weight "
                          f"(learnable_params.pt)")
    if kind == "policy":
        vectors = {}
        for key, v in state.items():
            m = POLICY_KEY.fullmatch(str(key))
            if m is None:
                raise T2FileError(f"{where}: unexpected key {key!r} beside "
                                  f"learnable_params_module_list.*")
            vectors[int(m.group(1))] = _vector(v, key, where)
        if sorted(vectors) != list(range(len(vectors))):
            raise T2FileError(f"{where}: the learnable_params_module_list indices are not "
                              f"0..{len(vectors) - 1}")
        return OfficialCheckpoint(kind, vectors)
    if kind == "legacy":
        return OfficialCheckpoint(kind, {k: _vector(v, k, where) for k, v in state.items()})
    alpha = state[WCOMB_ALPHA]
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or not alpha.is_floating_point() \
            or not bool(torch.isfinite(alpha).all()):
        raise T2FileError(f"{where}: {WCOMB_ALPHA} must be a finite 2-D float tensor "
                          f"[experts, 1 or matrices], got {getattr(alpha, 'shape', alpha)!r}")
    vectors = {}
    for key, v in state.items():
        if key == WCOMB_ALPHA:
            continue
        m = WCOMB_KEY.fullmatch(str(key))
        if m is None:
            raise T2FileError(f"{where}: unexpected key {key!r} in a weighted combination "
                              f"(expected {WCOMB_ALPHA} and weights_K_k_NAME)")
        vectors[int(m.group(1)), m.group(2)] = _vector(v, key, where)
    return OfficialCheckpoint(kind, vectors, alpha.detach().double())


def sigmoid_mask(p: torch.Tensor, max_mult: float = 1.0) -> torch.Tensor:
    """The official SVF policy's mask of a raw vector p: ``sigmoid(p)`` rounded to bf16, times
    ``max_mult`` (float64 [r])."""
    return torch.sigmoid(p.float()).to(torch.bfloat16).double() * max_mult


def rescaled_z(mask: torch.Tensor, S: torch.Tensor, target: str = "") -> torch.Tensor:
    """z = mask · Σσ / Σ(σ ⊙ mask) (float32 [r]): the official ``W'`` with the nuclear-norm
    rescale folded in, on the CPU whatever the device of ``S``. Raises when Σ(σ ⊙ mask) is not
    positive (no such ``W'`` exists)."""
    s, mask = S.detach().double().cpu(), mask.double().cpu()
    total = (s * mask).sum()
    if not bool(total > 0):
        raise ValueError(f"the official mask of {target or 'a matrix'} gives Σ(σ ⊙ mask) = "
                         f"{float(total):.3g}: the rescaled weight is undefined")
    return (mask * (s.sum() / total)).float()


def _masks(ckpt: OfficialCheckpoint, targets: list[str], where: str, max_mult: float,
           norm_coeffs: bool | None) -> dict[str, tuple[str, torch.Tensor]]:
    """{target: (its key in the checkpoint, the official mask, float64 [r])} for the model's
    ``targets`` (official order); raises when the checkpoint does not fit them."""
    keys = [t + ".weight" for t in targets]
    if ckpt.kind == "weighted-combination":
        return _combined_masks(ckpt, targets, where, max_mult, norm_coeffs)
    if norm_coeffs is not None:
        raise ValueError(f"{where} is a {ckpt.kind} checkpoint, not a weighted combination: "
                         f"norm_coeffs does not apply")
    if ckpt.kind == "policy":
        if len(ckpt.vectors) != len(targets):
            raise ValueError(f"{where} holds {len(ckpt.vectors)} vectors but the model has "
                             f"{len(targets)} MLP matrices (e.g. {targets[:3]}); was it trained "
                             f"on another model?")
        named = {t: (f"learnable_params_module_list.{i}", ckpt.vectors[i])
                 for i, t in enumerate(targets)}
    else:
        _same_names(set(ckpt.vectors), keys, where)
        named = {t: (k, ckpt.vectors[k]) for t, k in zip(targets, keys)}
        odd = sorted({str(p.dtype).replace("torch.", "") for _, p in named.values()} -
                     {"bfloat16"})
        if odd:
            warnings.warn(f"{where} holds {', '.join(odd)} vectors; the official SVF policy "
                          f"saves bfloat16 ones. A learnable_params.pt written by a weighted-"
                          f"combination run holds mixed raw values that the official code uses "
                          f"without the sigmoid: for such a run import its policy_params.pt "
                          f"instead", stacklevel=3)
    return {t: (key, sigmoid_mask(p, max_mult)) for t, (key, p) in named.items()}


def _same_names(have: set, keys: list, where: str) -> None:
    missing = [k for k in keys if k not in have]
    extra = sorted(have - set(keys))
    if missing or extra:
        raise ValueError(f"{where} does not fit the model: "
                         + (f"{len(missing)} of its MLP matrices are missing (e.g. "
                            f"{missing[:3]})" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"{len(extra)} names are not the model's (e.g. {extra[:3]})"
                            if extra else "")
                         + "; was it trained on another model?")


def _combined_masks(ckpt, targets, where, max_mult, norm_coeffs):
    """:func:`_masks` of a weighted combination: ``Σ_k c[k, i] · p_k`` (no sigmoid)."""
    if norm_coeffs is None:
        raise ValueError(f"{where} is a weighted combination, whose file does not record the "
                         f"run's norm_coeffs setting: give norm_coeffs=True or False (CLI: "
                         f"--norm-coeffs true|false; the official cfgs/policy/wcomb.yaml says "
                         f"true, scripts/eval_few_shot.sh passes false)")
    if max_mult != 1.0:
        raise ValueError(f"{where} is a weighted combination: the official code applies no "
                         f"max_mult (nor sigmoid) to it, so max_mult must stay 1")
    alpha = ckpt.alpha
    K = 1 + max(k for k, _ in ckpt.vectors) if ckpt.vectors else 0
    if alpha.shape[0] != K or alpha.shape[1] not in (1, len(targets)):
        raise ValueError(f"{where}: {WCOMB_ALPHA} has shape {tuple(alpha.shape)} but the file "
                         f"holds {K} experts and the model {len(targets)} MLP matrices; "
                         f"expected ({K}, 1) or ({K}, {len(targets)})")
    coeff = alpha / alpha.sum(0) if norm_coeffs else alpha
    if not bool(torch.isfinite(coeff).all()):
        raise ValueError(f"{where}: norm_coeffs divides {WCOMB_ALPHA} by its sum over the "
                         f"experts, which is 0 for some matrix")
    coeff = coeff.expand(K, len(targets))
    flat = [t.replace(".", "_") + "_weight" for t in targets]
    for k in range(K):
        _same_names({n for kk, n in ckpt.vectors if kk == k}, flat,
                    f"{where} (expert {k} of the combination)")
    return {t: (f"weights_*_k_{n}",
                sum(coeff[k, i] * ckpt.vectors[k, n].double() for k in range(K)))
            for i, (t, n) in enumerate(zip(targets, flat))}


def default_expert_name(checkpoint) -> str:
    """The name an imported expert gets without ``name``: its run's folder for the official
    file names (``policy_params.pt`` ...; the folder as resolved, also from inside it), else
    the file's stem."""
    path = Path(checkpoint)
    return path.resolve().parent.name if path.stem in RUN_FILES else path.stem


def import_official(checkpoint, model: nn.Module, name: str | None = None,
                    max_mult: float = 1.0, base_model: str = "", cache_dir=None,
                    progress: bool = True, norm_coeffs: bool | None = None) -> Expert:
    """Convert an official checkpoint into an :class:`Expert` for ``model`` (its base model).

    Args:
        checkpoint: ``policy_params.pt`` (an SVF policy or a weighted combination) or the
            legacy ``learnable_params.pt`` (see the module docstring).
        model: the base model the checkpoint was trained on (a Hugging Face causal LM).
        name: the expert's name (default: the run's folder for the official file names, else
            the file's stem).
        max_mult: the official policy's ``max_mult`` (1 in the released configs).
        cache_dir: SVD cache folder, as in :func:`t2fast.patch_model`.
        norm_coeffs: a weighted combination's ``norm_coeffs`` setting (required for one, which
            does not record it; must be None for the other kinds).
    Raises:
        T2FileError for an unreadable or malformed checkpoint; ValueError when it does not fit
        the model (count, names or lengths of the vectors), naming the matrix.
    """
    path = Path(checkpoint)
    where = f"official checkpoint {str(path)!r}"
    ckpt = read_official(path)
    targets = official_targets(model)
    masks = _masks(ckpt, targets, where, max_mult, norm_coeffs)
    decomp = decompose_weights(target_weights(model, targets), cache_dir=cache_dir,
                               progress=progress)
    z = {}
    for target, (key, mask) in masks.items():
        f = decomp.factors[target]
        if mask.shape[0] != f.rank:
            raise ValueError(f"{where}: {key} has length {mask.shape[0]} but {target} has rank "
                             f"{f.rank}")
        z[target] = rescaled_z(mask, f.S, target)
    name = name or default_expert_name(path)
    extra = {"source": "official Transformer² checkpoint", "file": path.name,
             "format": ckpt.kind}
    if ckpt.kind == "weighted-combination":
        extra.update(alpha=ckpt.alpha.tolist(), norm_coeffs=norm_coeffs)
    else:
        extra["max_mult"] = max_mult
    return Expert(name, z, base_model, Fingerprint.of(decomp.factors), extra=extra)
