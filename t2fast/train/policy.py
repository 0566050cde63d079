"""What the trainer trains: SVF z vectors on a patched model, or a PEFT LoRA adapter (baseline).

A policy gives the trainer four things:
    ``training()``  a context in which ``policy.model`` forwards differentiably through the
                    trainable parameters (SVF: W' = U diag(σ⊙z) Vᵀ built with autograd through z
                    only);
    ``acting()``    a context for fast, gradient-free rollouts and evaluation with the current
                    parameters (SVF: merged dense weights, computed once per context);
    ``base()``      a context in which the model is exactly the base model (SVF: the original
                    weights; LoRA: adapters disabled);
    ``reference()`` the KL's reference: the base model as the trainable path computes it (SVF in
                    bf16/fp16: W = U diag(σ) Vᵀ from the same rounded factors, so that z = 1
                    has KL 0; otherwise ``base()``);
    ``state_dict`` / ``load_state_dict`` / ``save`` / ``num_parameters``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..runtime import MergeBudgetError
from ..targets import resolve_targets


def portable_model_name(name: str) -> str:
    """A base-model name fit for files that are shared: a local folder path becomes its last
    component (``/any/where/tiny_llama`` → ``tiny_llama``); hub ids (``org/name``) stay."""
    name = str(name or "")
    p = Path(name)
    if p.is_absolute() or name.startswith(".") or p.exists():
        return p.name or name
    return name
from .config import TrainConfig
from .parameterization import ZParameterization


class SVFPolicy:
    """SVF experts: z per adapted matrix (see :mod:`t2fast.train.parameterization`)."""

    kind = "svf"

    def __init__(self, handle, param: ZParameterization):
        self.handle = handle
        self.model = handle.model
        self.param = param
        self._warned_budget = False

    @classmethod
    def create(cls, model, config: TrainConfig, init_z=None) -> "SVFPolicy":
        import t2fast
        model.requires_grad_(False)
        handle = t2fast.patch_model(model, config=config.svf_config(), progress=False)
        param = ZParameterization(handle.decomposition.factors, config.parameterization,
                                  config.official_init, init_z=init_z,
                                  device=next(model.parameters()).device)
        return cls(handle, param)

    def parameters(self):
        return list(self.param.parameters())

    def num_parameters(self) -> int:
        return self.param.num_parameters()

    @contextmanager
    def training(self):
        self.handle.set_trainable_z(self.param.effective())
        try:
            yield self.model
        finally:
            self.handle.set_trainable_z(None)

    @contextmanager
    def acting(self):
        """Merged dense weights of the current z; where they exceed the merge cache's budget,
        the trainable path without gradients (W' rebuilt per forward: slower, the same
        weights up to rounding), with one warning."""
        with torch.no_grad():
            z = self.param.effective()
            self.handle.set_trainable_z(None)
            try:
                self.handle.merge_z(z)
            except MergeBudgetError as exc:
                if not self._warned_budget:
                    self._warned_budget = True
                    warnings.warn(f"{exc}; rollouts and evaluation rebuild each adapted weight "
                                  f"per forward instead", RuntimeWarning, stacklevel=3)
                with self._at(z) as model:
                    yield model
                return
            try:
                yield self.model
            finally:
                self.handle.set_mixture(None)

    @contextmanager
    def base(self):
        self.handle.set_trainable_z(None)
        self.handle.set_mixture(None)
        with torch.no_grad():
            yield self.model

    @contextmanager
    def reference(self):
        """The base model for the KL term. In bf16/fp16 the product of the rounded factors
        differs from the original weights (by up to 0.14 in the bundled model's logits),
        which would give z = 1 a KL floor that z then moves to undo: the reference is z = 1
        on the trainable path. In float32 it is :meth:`base`."""
        layer = next(iter(self.handle.modules.values()))
        if layer.U.dtype not in (torch.bfloat16, torch.float16):
            with self.base() as model:
                yield model
            return
        with self._at({n: torch.ones(m.rank, dtype=torch.float32, device=m.U.device)
                       for n, m in self.handle.modules.items()}) as model:
            yield model

    @contextmanager
    def _at(self, z: dict):
        """The model on the trainable path at ``z`` ({target: z [r]}), without gradients:
        each adapted weight rebuilt per forward."""
        self.handle.set_mixture(None)
        self.handle.set_trainable_z(z)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.handle.set_trainable_z(None)

    @property
    def fingerprint(self):
        """The base model's :class:`t2fast.experts.Fingerprint` (a checkpoint's model)."""
        return self.handle.fingerprint

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.param.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.param.load_state_dict(state)

    def expert(self, name: str, extra: dict | None = None):
        e = self.handle.new_expert(name, self.param.export())
        e.base_model = portable_model_name(e.base_model)
        e.extra = dict(extra or {})
        return e

    def save(self, path, name: str, extra: dict | None = None) -> Path:
        return self.expert(name, extra).save(path)

    def close(self):
        """Put the original modules back (the policy is then unusable)."""
        self.handle.restore()


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("the LoRA baseline needs the 'peft' package: pip install peft "
                          "(or pip install 't2fast[peft]')") from None
    return peft


class LoRAPolicy:
    """LoRA adapters (PEFT) on the same target matrices: the paper's baseline."""

    kind = "lora"
    #: no fingerprint of the base model: a resumed LoRA run is not checked against it
    fingerprint = None

    def __init__(self, peft_model):
        self.model = peft_model

    @classmethod
    def create(cls, model, config: TrainConfig) -> "LoRAPolicy":
        peft = _require_peft()
        names = resolve_targets(model, config.targets, config.layers)
        cfg = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                              lora_dropout=config.lora_dropout, target_modules=names,
                              bias="none")
        pm = peft.get_peft_model(model, cfg)
        pm.eval()
        return cls(pm)

    @classmethod
    def load(cls, model, path) -> "LoRAPolicy":
        """The adapter in the local PEFT folder ``path`` on ``model`` (never a Hub lookup)."""
        path = lora_folder(path)
        peft = _require_peft()
        try:
            pm = peft.PeftModel.from_pretrained(model, str(path), is_trainable=False)
        except RuntimeError as exc:     # PEFT's load_state_dict: "size mismatch for ..."
            if "size mismatch" not in str(exc):
                raise
            first = next(line.strip() for line in str(exc).splitlines() if "size mismatch" in line)
            raise ValueError(f"LoRA adapter {str(path)!r} was made for a model of other "
                             f"shapes: {first}") from None
        pm.eval()
        return cls(pm)

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextmanager
    def training(self):
        yield self.model

    @contextmanager
    def acting(self):
        with torch.no_grad():
            yield self.model

    @contextmanager
    def base(self):
        with torch.no_grad(), self.model.disable_adapter():
            yield self.model

    reference = base

    def _names(self):
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in self._names()}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    def save(self, path, name: str, extra: dict | None = None) -> Path:
        import json
        path = Path(path)
        card = path / "README.md"            # PEFT writes (or adds to) a model card there
        mine = card.read_bytes() if card.is_file() else None
        self.model.save_pretrained(str(path))
        if mine is None:
            card.unlink(missing_ok=True)
        else:                                # the folder's own README stays as it was
            card.write_bytes(mine)
        cfg_path = path / "adapter_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = portable_model_name(
                cfg.get("base_model_name_or_path", ""))
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (path / "t2fast_meta.json").write_text(json.dumps({"name": name, "extra": extra or {}},
                                                          indent=2, default=str))
        return path

    def close(self):
        pass


#: The weight files of a PEFT adapter folder (one of them).
LORA_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def lora_folder(path, what: str = "LoRA adapter") -> Path:
    """``path`` as a Path if it is a local PEFT adapter folder, else FileNotFoundError saying
    why (``what`` names it in the message). Never a Hub name: no network lookup."""
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        if not any((p / f).is_file() for f in LORA_WEIGHTS):
            raise FileNotFoundError(f"{what} {str(path)!r} has an adapter_config.json but no "
                                    f"weights ({' or '.join(LORA_WEIGHTS)}); PEFT would look "
                                    f"it up on the Hub")
        return p
    hint = ("; it is a t2fast expert: use --expert or t2fast.load_expert"
            if p.suffix == ".safetensors" or (p / "expert_config.json").is_file() else "")
    why = ("does not exist" if not p.exists() else
           "is not a LoRA adapter folder (no adapter_config.json)")
    raise FileNotFoundError(f"{what} {str(path)!r} {why}{hint}")


def make_policy(model, config: TrainConfig, init_z=None):
    if config.method == "svf":
        return SVFPolicy.create(model, config, init_z=init_z)
    if config.method == "lora":
        return LoRAPolicy.create(model, config)
    raise ValueError(f"unknown method {config.method!r}")
