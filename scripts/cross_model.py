"""Cross-model transfer: SVF experts of the bundled model applied to a second base model.

The paper (§4.4) moves z vectors trained on one LLM to another with the same matrix shapes. An
expert's entry z[i] scales its model's i-th largest singular value; a second model trained from
another random initialisation has unrelated singular vectors, so the only thing an entry can
keep is its *position in the σ order*. :func:`reorder` builds the arms that test whether that
position carries anything:

* ``matched``: z as trained, z[i] on the second model's i-th largest σ;
* ``reversed``: z[i] on the i-th *smallest* σ (the σ order not matched);
* ``shuffled`` (the control): each matrix's z under its own random permutation (one seed per
  row), same values, no order.

The second base model (``results/second_base/``) has the bundled model's shapes and training
mixture but another seed and a random start; ``scripts/make_results.py`` measures the arms on
it (section "Cross-model transfer" of ``results/README.md``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from t2fast.experts import Expert

#: The arms measured besides the second model's base, in table order.
ARMS = ("matched", "reversed", "shuffled")
#: Seeds of the shuffled control (one row each).
SHUFFLE_SEEDS = (0, 1, 2)
#: The second base model, relative to the repository root.
SECOND_BASE = Path("results") / "second_base"


def reorder(expert: Expert, arm: str, seed: int = 0) -> Expert:
    """``expert`` with each matrix's z (float32 [r]) put in the order of ``arm`` (:data:`ARMS`);
    ``seed`` draws the permutations of ``shuffled`` (one per matrix, in sorted target order).

    The new expert is named ``{name}_{arm}`` (``{name}_shuffled{seed}``) and keeps the original's
    base model and fingerprint: loading it into another model needs ``allow_other_model``.
    """
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}: expected one of {ARMS}")
    gen = torch.Generator().manual_seed(seed)
    z = {}
    for target in sorted(expert.z):
        v = expert.z[target].float()
        if arm == "matched":
            z[target] = v.clone()
        elif arm == "reversed":
            z[target] = v.flip(0)
        else:
            z[target] = v[torch.randperm(v.numel(), generator=gen)]
    name = f"{expert.name}_{arm}" + (str(seed) if arm == "shuffled" else "")
    return Expert(name, z, expert.base_model, expert.fingerprint,
                  {**expert.extra, "cross_model_arm": arm,
                   **({"shuffle_seed": seed} if arm == "shuffled" else {})})


def weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's ``model.safetensors``."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()
