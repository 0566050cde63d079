"""Import SVF experts trained with the official Transformer² code (SakanaAI/self-adaptive-llms).

The official trainer saves ``policy.state_dict()`` with ``torch.save``: one raw, pre-sigmoid
vector ``p`` (bf16, length ``min(m, n)``) per adapted matrix, under the keys
``learnable_params_module_list.{i}``, in the order of the base model's ``state_dict()`` keys
that contain ``"mlp"`` (per layer: ``gate_proj``, ``up_proj``, ``down_proj``). It applies::

    mask = sigmoid(p).to(bfloat16) * max_mult
    W'   = U diag(σ ⊙ mask) Vᵀ · Σσ / Σ(σ ⊙ mask)

The nuclear-norm rescale is a per-matrix scalar, so it folds into z: the t2fast expert holds
``z = mask · Σσ / Σ(σ ⊙ mask)`` and gives the same ``W'`` (``U diag(σ ⊙ z) Vᵀ``).

    t2fast import-official policy_params.pt --model DIR --out expert.safetensors
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .decompose import decompose_weights
from .experts import Expert, Fingerprint
from .safetensors_io import T2FileError
from .targets import FUSED, target_weights

OFFICIAL_KEY = re.compile(r"learnable_params_module_list\.(\d+)")


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


def read_official(path) -> list[torch.Tensor]:
    """The vectors p of an official checkpoint, in order (read with ``weights_only=True``)."""
    path = Path(path)
    where = f"official checkpoint {str(path)!r}"
    if not path.is_file():
        raise T2FileError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise T2FileError(f"{where} cannot be read with torch.load(weights_only=True): "
                          f"{exc}") from None
    if not isinstance(state, dict) or not state:
        raise T2FileError(f"{where} is not a state dict (got {type(state).__name__})")
    index = {}
    for key, v in state.items():
        m = OFFICIAL_KEY.fullmatch(str(key))
        if m is None:
            raise T2FileError(f"{where}: unexpected key {key!r}; the official format holds "
                              f"learnable_params_module_list.0, .1, ...")
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise T2FileError(f"{where}: {key} must be a 1-D float tensor, got "
                              f"{getattr(v, 'shape', type(v).__name__)}")
        if not bool(torch.isfinite(v).all()):
            raise T2FileError(f"{where}: {key} contains NaN or Inf")
        index[int(m.group(1))] = v
    if sorted(index) != list(range(len(index))):
        raise T2FileError(f"{where}: the learnable_params_module_list indices are not "
                          f"0..{len(index) - 1}")
    return [index[i] for i in range(len(index))]


def official_z(p: torch.Tensor, S: torch.Tensor, max_mult: float = 1.0) -> torch.Tensor:
    """t2fast's z (float32 [r]) for the official raw vector p and singular values S [r]."""
    mask = torch.sigmoid(p.float()).to(torch.bfloat16).double() * max_mult
    s = S.double()
    return (mask * (s.sum() / (s * mask).sum())).float()


def import_official(checkpoint, model: nn.Module, name: str | None = None,
                    max_mult: float = 1.0, base_model: str = "", cache_dir=None,
                    progress: bool = True) -> Expert:
    """Convert an official checkpoint into an :class:`Expert` for ``model`` (its base model).

    Args:
        checkpoint: the official ``policy_params.pt``.
        model: the base model the checkpoint was trained on (a Hugging Face causal LM).
        name: the expert's name (default: the checkpoint's parent folder or file stem).
        max_mult: the official policy's ``max_mult`` (1 in the released configs).
        cache_dir: SVD cache folder, as in :func:`t2fast.patch_model`.
    Raises:
        T2FileError for an unreadable or malformed checkpoint; ValueError when it does not fit
        the model (count or length of the vectors), naming the matrix.
    """
    ps = read_official(checkpoint)
    targets = official_targets(model)
    if len(ps) != len(targets):
        raise ValueError(f"official checkpoint {str(checkpoint)!r} holds {len(ps)} vectors but "
                         f"the model has {len(targets)} MLP matrices (e.g. {targets[:3]}); "
                         f"was it trained on another model?")
    decomp = decompose_weights(target_weights(model, targets), cache_dir=cache_dir,
                               progress=progress)
    z = {}
    for i, (target, p) in enumerate(zip(targets, ps)):
        f = decomp.factors[target]
        if p.shape[0] != f.rank:
            raise ValueError(f"official checkpoint {str(checkpoint)!r}: "
                             f"learnable_params_module_list.{i} has length {p.shape[0]} but "
                             f"{target} has rank {f.rank}")
        z[target] = official_z(p, f.S, max_mult)
    path = Path(checkpoint)
    name = name or (path.parent.name if path.stem == "policy_params" else path.stem)
    return Expert(name, z, base_model, Fingerprint.of(decomp.factors),
                  extra={"source": "official Transformer² checkpoint", "file": path.name,
                         "max_mult": max_mult})
