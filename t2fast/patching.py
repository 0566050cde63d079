"""Patch a Hugging Face causal LM in place so every batch row can use its own expert mixture.

    import t2fast
    handle = t2fast.patch_model(model, experts=["math.safetensors", "code.safetensors"])
    handle.set_mixture(rows=["math", {"math": 0.5, "code": 0.5}, None])   # one per batch row
    out = model.generate(input_ids, ...)
    handle.set_mixture({"math": 0.3, "code": 0.7})   # one mixture for every row of any batch
    handle.merge("code")        # dense weights for a single-mixture batch
    handle.restore()            # the original modules, bit for bit

``t2fast.patch_model`` is this module's :func:`patch_model` (the module is
:mod:`t2fast.patching`, so each name says one thing).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from pathlib import Path

import torch
from torch import nn

from . import ops
from .config import SVFConfig
from .decompose import Decomposition, SVDFactors, decompose_model
from .experts import Expert, Fingerprint, expert_targets
from .layers import (FusedSVF, SVFLinear, check_placement, group_members, link_groups,
                     refuse_weight, row_block)
from .messages import shown
from .mixtures import MixtureBounds, MixtureError, parse_mixture
from .runtime import SVFRuntime, load_sources
from .targets import layer_index, linear_matrices, resolve_targets, target_modules


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _num_layers(model: nn.Module, targets: list[str]) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    found = [i for i in (layer_index(t) for t in targets) if i is not None]
    return max(int(n or 0), 1 + max(found, default=0))


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or
               type(model).__name__)


class SVFHandle:
    """Controls a patched model: experts, per-row mixtures, merging, restoring.

    Attributes:
        model: the patched model.
        config: the :class:`t2fast.config.SVFConfig` it was patched with.
        decomposition: the :class:`t2fast.decompose.Decomposition` of the targets.
        targets: adapted module names, in model order.
        modules: ``{target name: SVFLinear}``.
        runtime: the :class:`t2fast.runtime.SVFRuntime` every layer reads (expert bank, α
            table, row → slot map, mode, merge cache, statistics).
        bank: the runtime's :class:`t2fast.runtime.ExpertBank` of loaded experts.
        stats: the runtime's counters (:data:`t2fast.runtime.STATS`): how often each mode
            (``base``, ``merged``, ``factored``) was chosen, mixtures merged, merge-cache hits,
            evictions and single-mixture batches over the merge budget.
        mixture_bounds: the :class:`t2fast.mixtures.MixtureBounds` every mixture must meet
            (read from ``config``; setting it replaces ``config``'s bounds).
        keep_dense, hybrid: ``config``'s settings (read-only).
        lock: a re-entrant lock held by every call that changes the handle's state
            (``set_mixture``, ``merge``, ``merge_z``, ``unmerge``, ``add_experts``,
            ``remove_experts``, ``set_trainable_z``, ``restore``) and by every call of the
            model's ``forward``, so a forward pass sees one mixture whole and concurrent
            ``set_mixture`` calls apply one after the other.
            Hold it yourself (``with handle.lock:``) to keep a mixture across several forward
            calls (``generate``) while other threads use the model. A CUDA graph replay or a
            direct call of a submodule does not take it.

    The decomposition's factors share the layers' U and Vh (in the weight's dtype) once the
    model is patched, so the model holds one copy of them.
    """

    def __init__(self, model: nn.Module, decomposition: Decomposition, config: SVFConfig,
                 experts: list[Expert] = ()):
        self.model = model
        self.config = config
        self.decomposition = decomposition
        self.targets = decomposition.targets
        self.num_layers = _num_layers(model, self.targets)
        self.base_model = _model_name(model)
        self.fingerprint = Fingerprint.of(decomposition.factors)
        self.lock = threading.RLock()
        self._originals: dict[str, nn.Linear] = {}     # module name → the original module
        self.modules: dict[str, SVFLinear] = {}
        self._restored = False
        swaps = {}
        for module_name, parts in target_modules(model, self.targets).items():
            linear = model.get_submodule(module_name)
            self._originals[module_name] = linear
            blocks = {module_name: linear} if parts is None else {
                logical: row_block(linear, a, b) for logical, a, b in parts}
            for name, dense in blocks.items():
                if name in decomposition.factors:
                    self.modules[name] = SVFLinear(name, decomposition.factors[name], dense,
                                                  layer_index(name) or 0, config.backend,
                                                  config.deterministic)
            swaps[module_name] = self.modules[module_name] if parts is None else FusedSVF(
                module_name, [self.modules.get(n, dense) for n, dense in blocks.items()])
        originals = dict(self._originals)
        try:            # from the first swap on, any exception (KeyboardInterrupt too) undoes all
            self._put(swaps)
            self._install_guards()
            self._finish_init(decomposition, config, experts)
        except BaseException:
            self._put(originals)
            self._remove_guards()
            self._restored = True
            raise

    def _finish_init(self, decomposition: Decomposition, config: SVFConfig,
                     experts: list[Expert]) -> None:
        groups = group_members(self.modules)
        link_groups(groups)                         # q/k/v, gate/up: one op each
        for name, layer in self.modules.items():    # one copy of U, Vh: the layers'
            decomposition.factors[name] = SVDFactors(layer.U, layer.S, layer.Vh)
        first = next(iter(self.modules.values()), None)
        self.runtime = SVFRuntime(
            self.num_layers, capacity=max(config.max_experts, len(experts)),
            device=first.U.device if first is not None else "cpu",
            bounds=config.mixture_bounds, hybrid=config.hybrid,
            mix_in_kernel=config.mix_in_kernel, merge_cache_bytes=config.merge_cache_bytes)
        for members in groups:
            self.runtime.add_group([(m.name, m.rank) for m in members], members[0].layer,
                                   members[0].U.device)
        for layer in self.modules.values():
            layer.runtime = self.runtime
        self.runtime.merged_bytes = sum(l.out_features * l.in_features * l.U.element_size()
                                        for l in self.modules.values())
        if not config.keep_dense:
            self._drop_dense()
        if experts:
            self.add_experts(experts, allow_other_model=config.allow_other_model)
        else:
            self.set_mixture(None)

    def _put(self, modules: dict[str, nn.Module]) -> None:
        """Set each ``{module name: module}`` in the model."""
        for module_name, module in modules.items():
            parent, attr = _parent(self.model, module_name)
            setattr(parent, attr, module)

    def _install_guards(self) -> None:
        """Install the patched model's guards, instance attributes that :meth:`restore` removes:
        every call of ``forward`` runs under :attr:`lock`; a cast or move (``to``, ``half``,
        ``cuda`` ...: ``_apply``) that would change the SVF factors' dtype or device is refused
        before anything changes (the expert tables, merged weights and original weights are
        placed once, at patch time; a submodule's cast meets each SVF layer's own check), and so
        are ``copy.deepcopy`` and pickling (the copy would share, or lose, the handle's runtime)
        and ``load_state_dict`` with a weight for an SVF layer (checked before anything loads).
        """
        model, lock, layers = self.model, self.lock, self.modules
        inner, inner_apply, inner_load = model.forward, model._apply, model.load_state_dict
        adapted = list(self._originals)             # the swapped modules' names

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            with lock:
                return inner(*args, **kwargs)

        def _apply(fn, *args, **kwargs):
            check_placement(layers.values(), fn)
            return inner_apply(fn, *args, **kwargs)

        def load_state_dict(state_dict, *args, **kwargs):
            for name in adapted:
                refuse_weight(name, state_dict, f"{name}.")
            return inner_load(state_dict, *args, **kwargs)

        def refuse_copy(*args):
            raise TypeError("t2fast: a patched model cannot be copied or pickled: its SVF layers "
                            "read the handle's runtime (expert bank, mixtures). Copy or save "
                            "the model before patch_model, or save the adapted weights with "
                            "handle.merge(spec) and save_pretrained")

        guards = {"forward": forward, "_apply": _apply, "__deepcopy__": refuse_copy,
                  "__reduce_ex__": refuse_copy, "load_state_dict": load_state_dict}
        self._guards_before = {k: model.__dict__.get(k) for k in guards}
        self._guards = guards
        for name, guard in guards.items():
            setattr(model, name, guard)

    def _remove_guards(self) -> None:
        """Remove the guards of :meth:`_install_guards` (one replaced since is left)."""
        for name, guard in getattr(self, "_guards", {}).items():
            if self.model.__dict__.get(name) is not guard:
                continue
            before = self._guards_before[name]
            if before is None:
                delattr(self.model, name)
            else:
                setattr(self.model, name, before)

    # ---- experts -------------------------------------------------------------------------
    @property
    def bank(self):
        """The runtime's :class:`t2fast.runtime.ExpertBank`."""
        return self.runtime.bank

    @property
    def stats(self) -> dict:
        return self.runtime.stats

    @property
    def expert_names(self) -> list[str]:
        return self.runtime.expert_names

    def add_experts(self, experts, allow_other_model: bool | None = None,
                    replace: bool = False) -> None:
        """Add experts (``Expert`` objects, expert files or expert folders) to the bank.

        Every expert is checked before the bank changes (a failure leaves it as it was). Names
        must be unique; a name already in the bank is an error unless ``replace=True``, which
        swaps that expert in place (its bank row is kept). The bank holds ``max_experts``
        (:class:`t2fast.config.SVFConfig`). Every row is then on the base model.
        ``allow_other_model``: accept experts made for another base model of equal shapes
        (default: the handle's ``SVFConfig.allow_other_model``).
        """
        if allow_other_model is None:
            allow_other_model = self.config.allow_other_model
        with self.lock:
            self._check_live()
            loaded = load_sources(_sources(experts), self.decomposition.factors,
                                  self.fingerprint, allow_other_model)
            self.runtime.load_experts(loaded, replace)

    def remove_experts(self, names) -> None:
        """Remove experts from the bank (their rows become free); every row is then on the base
        model."""
        with self.lock:
            self._check_live()
            self.runtime.unload_experts([names] if isinstance(names, str) else list(names))

    def new_expert(self, name: str, z: dict[str, torch.Tensor] | None = None) -> Expert:
        """An :class:`Expert` for this model (z = 1 where ``z`` is not given), with its base
        model name and fingerprint. It is *not* added to the bank: pass it to
        :meth:`add_experts` (or save it) to use it."""
        unknown = sorted(set(z or {}) - set(self.decomposition.factors))
        if unknown:
            raise ValueError(f"new_expert: z given for {unknown[:3]}, which are not adapted "
                             f"here (targets: {self.targets[:3]}...)")
        full = {n: torch.ones(f.rank, dtype=torch.float32)
                for n, f in self.decomposition.factors.items()}
        full.update({n: v.detach().float().cpu() for n, v in (z or {}).items()})
        return Expert(name, full, self.base_model, self.fingerprint)

    # ---- settings (read from :attr:`config`) ---------------------------------------------
    @property
    def keep_dense(self) -> bool:
        return self.config.keep_dense

    @property
    def hybrid(self) -> bool:
        return self.config.hybrid

    @property
    def mixture_bounds(self) -> MixtureBounds:
        return self.config.mixture_bounds

    @mixture_bounds.setter
    def mixture_bounds(self, bounds: MixtureBounds) -> None:
        self.config = dataclasses.replace(self.config, max_alpha_abs=bounds.max_abs,
                                          max_alpha_l1=bounds.max_l1)
        self.runtime.bounds = self.config.mixture_bounds

    # ---- mixtures ------------------------------------------------------------------------
    def alpha(self, spec) -> torch.Tensor:
        """α [num_layers, K + 1] (bank order, column 0 the base) of a mixture spec (see
        :func:`t2fast.mixtures.parse_mixture`), within :attr:`mixture_bounds`."""
        return parse_mixture(spec, self.expert_names, self.num_layers, self.mixture_bounds)

    def set_mixture(self, spec=None, *, rows=None) -> str:
        """Set the batch's mixture(s); returns the path chosen ("base"/"merged"/"factored").

        ``set_mixture(spec)``: ONE mixture for every row of any batch. ``spec`` is ``None``/
        ``"base"``, an expert name, ``{name: weight or per-layer weights}``, K weights in bank
        order, or a ``[num_layers, K]`` per-layer α (:mod:`t2fast.mixtures`): a nested list is
        always one per-layer spec.
        ``set_mixture(rows=[spec_0, ..., spec_B-1])``: one spec per batch row; every forward
        pass must then have exactly B rows, on every path.

        With ``hybrid`` on, a batch whose rows share one mixture is served by dense weights (the
        original ones for the base, a merge cached within ``merge_cache_bytes`` otherwise).
        Every spec is parsed before anything changes; the call holds :attr:`lock`, as every
        forward of the model does, so a forward sees the mixtures of one call, whole.
        """
        if rows is not None and spec is not None:
            raise TypeError("set_mixture takes one spec for the whole batch or rows=[one spec "
                            "per row], not both")
        if rows is not None and not isinstance(rows, (list, tuple)):
            raise TypeError(f"set_mixture(rows=...) must be a list or tuple with one mixture "
                            f"per batch row, got {type(rows).__name__} {shown(rows)}")
        if rows is not None and not rows:
            raise ValueError("set_mixture got an empty list of rows")
        with self.lock:
            self._check_live()
            if rows is None:
                mode = self.runtime.set_batch_mixture(self._alpha_of(spec))
            else:
                mode = self.runtime.set_row_mixtures([self.runtime.alpha_of(s) for s in rows])
            self._build_merged()
            return mode

    def _alpha_of(self, spec) -> torch.Tensor:
        """The runtime's α of one batch-wide spec, with a hint when a list of specs was given."""
        try:
            return self.runtime.alpha_of(spec)
        except MixtureError as exc:
            if not isinstance(spec, (list, tuple)) or not any(
                    s is None or isinstance(s, (str, dict)) for s in spec):
                raise
            raise type(exc)(f"{exc}; set_mixture(spec) takes one mixture for the whole batch: "
                            f"pass rows=[...] for one mixture per batch row") from None

    def _build_merged(self) -> None:
        """In mode "merged", merge every layer's weight now (cached), not in the forward."""
        if self.runtime.mode == "merged":
            for layer in self.modules.values():
                layer.dense_weight()

    def merge(self, spec) -> None:
        """Serve every row with one mixture through dense weights (merged, cached within
        ``merge_cache_bytes``; the original ones for the base), whatever ``hybrid`` says."""
        with self.lock:
            self._check_live()
            self.runtime.set_batch_mixture(self.runtime.alpha_of(spec), dense=True)
            self._build_merged()

    def merge_z(self, z: dict[str, torch.Tensor]) -> None:
        """Serve every row with dense weights merged from explicit z vectors ``{target: z [r]}``
        that are not in the bank (a policy being trained), cached like any merge. A captured
        factored path serves the base model meanwhile."""
        with self.lock:
            self._check_live()
            missing = [n for n in self.modules if n not in z]
            if missing:
                raise ValueError(f"merge_z: no z given for {missing[:3]}")
            digest = hashlib.sha256()
            for name in self.modules:
                digest.update(z[name].detach().float().cpu().numpy().tobytes())
            self.runtime.set_batch_weights(digest.digest())
            for name, layer in self.modules.items():
                self.runtime.merged(name, lambda _, l=layer, v=z[name]: l.merge(v))

    def unmerge(self) -> None:
        """Back to the factored path (base mixture for every row)."""
        with self.lock:
            self._check_live()
            self.runtime.set_batch_mixture(self.runtime.base_alpha(), dense=False)

    # ---- training hook -------------------------------------------------------------------
    def set_trainable_z(self, z: dict[str, nn.Parameter] | None) -> None:
        """Route every row through differentiable ``W' = U diag(S ⊙ z) Vh`` (training).

        ``z`` maps target names to Parameters [r]; ``None`` leaves training mode. Every z is
        checked before any layer changes.
        """
        with self.lock:
            self._check_live()
            for name, layer in self.modules.items() if z is not None else ():
                if name not in z:
                    raise ValueError(f"set_trainable_z: no z given for target {name}")
                if z[name].shape != (layer.rank,):
                    raise ValueError(f"set_trainable_z: z for {name} has shape "
                                     f"{tuple(z[name].shape)}, expected ({layer.rank},)")
                if z[name].device != layer.S.device:
                    raise ValueError(f"set_trainable_z: z for {name} is on {z[name].device}, "
                                     f"the layer on {layer.S.device}")
            for name, layer in self.modules.items():
                layer.train_z = None if z is None else z[name]

    # ---- restore -------------------------------------------------------------------------
    def restore(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back (bit for bit); the handle is then spent.

        With ``keep_dense=False`` the dropped weights are rebuilt from the factors,
        ``U diag(σ) Vh`` in the weight's dtype: as exact as the factors the layers hold
        (``decomposition.report()``; in bf16 about one bf16 rounding), not bit for bit.
        """
        with self.lock:
            self._check_live()
            self._put({name: self._rebuild_linear(name) if linear is None else linear
                       for name, linear in self._originals.items()})
            self._remove_guards()
            self._restored = True
            self.runtime.merge_cache.clear()
            return self.model

    # ---- memory --------------------------------------------------------------------------
    def _drop_dense(self) -> None:
        """Forget the original dense weights of plain (unfused) targets, so they can be freed.

        A fused projection (``qkv_proj``) keeps its dense storage: its unadapted parts are views
        of it.
        """
        for module_name in list(self._originals):
            if module_name in self.modules:
                self._originals[module_name] = None
                self.modules[module_name].dense = None

    def _rebuild_linear(self, name: str) -> nn.Linear:
        layer = self.modules[name]
        w = (layer.U.float() * layer.S) @ layer.Vh.float()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=w.device, dtype=layer.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
        if layer.bias is not None:
            linear.bias = layer.bias
        return linear

    def memory_report(self) -> dict:
        """Bytes the patched model holds for each adapted matrix, by role, and their totals,
        with the runtime's tables and merge cache (:meth:`t2fast.runtime.SVFRuntime.
        memory_report`: ``merge_budget`` is the cache's budget).

        Roles per matrix: ``dense`` (the original weight, 0 with ``keep_dense=False``), ``U``,
        ``S``, ``Vh`` and ``merged`` (its merged weights cached for single-mixture batches).
        """
        def nbytes(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        entries = self.runtime.merge_cache.entries.values()
        per = {name: dict(dense=nbytes(layer.dense), U=nbytes(layer.U), S=nbytes(layer.S),
                          Vh=nbytes(layer.Vh),
                          merged=sum(nbytes(e.get(name)) for e in entries))
               for name, layer in self.modules.items()}
        total = {k: sum(v[k] for v in per.values()) for k in next(iter(per.values()), {})}
        total["all"] = sum(total.values())
        return dict(keep_dense=self.keep_dense, per_matrix=per, total=total,
                    runtime=self.runtime.memory_report())

    def _check_live(self) -> None:
        if self._restored:
            raise RuntimeError("this SVFHandle was restored; call t2fast.patch_model again")


def _sources(experts) -> list:
    """``experts`` (None, one or a list of ``Expert`` objects and file/folder paths) as a
    list."""
    if experts is None:
        return []
    if isinstance(experts, (str, Path, Expert)):
        experts = [experts]
    if isinstance(experts, dict):       # iterating it would read its keys as file names
        raise TypeError("experts must be Expert objects or expert file/folder paths, got a "
                        "dict; pass a list (an expert's name is in its file)")
    experts = list(experts)
    for e in experts:
        if not isinstance(e, (str, Path, Expert)):
            raise TypeError(f"experts must be Expert objects or expert file/folder paths, got "
                            f"{type(e).__name__}")
    return experts


def _expert_targets(model: nn.Module, sources: list) -> list[str]:
    """The matrices every expert of ``sources`` adapts (they must agree), checked to be linear
    matrices of ``model``; raises ``ValueError`` naming the experts and a few matrices."""
    found = {}
    for e in sources:
        where = f"expert {e.name!r}" if isinstance(e, Expert) else f"expert {str(e)!r}"
        found[where] = e.targets if isinstance(e, Expert) else expert_targets(e)
    (first, targets), *others = found.items()
    for where, names in others:
        if set(names) != set(targets):
            diff = sorted(set(names) ^ set(targets))
            raise ValueError(f"the experts adapt different matrices ({first}: {len(targets)}, "
                             f"{where}: {len(names)}; e.g. {[n[:80] for n in diff[:3]]} in one "
                             f"only): pass targets= to patch_model")
    missing = sorted(set(targets) - {name for name, _ in linear_matrices(model)})
    if not targets or missing:
        why = ("this model carries PEFT adapters (their layers wrap the linear modules and "
               "prefix the names): merge them (merge_and_unload()) or patch the model without "
               "them" if any(hasattr(m, "lora_A") for m in model.modules()) else
               "it was made for another model")
        raise ValueError(f"{first} adapts {len(targets)} matrices, {len(missing)} of which are "
                         f"not linear modules of this model (e.g. "
                         f"{[n[:80] for n in missing[:3]]}): {why}")
    return resolve_targets(model, list(targets))


def patch_model(model: nn.Module, experts=(), targets=None, layers=None, *,
                config: SVFConfig | None = None, progress: bool = True,
                mixture_bounds: MixtureBounds | None = None, **settings) -> SVFHandle:
    """Swap the target ``nn.Linear`` modules of ``model`` for :class:`SVFLinear` layers.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Qwen2 families; others by pattern).
        experts: ``Expert`` objects or expert file paths to load into the bank.
        targets, layers: the matrices to adapt (:func:`t2fast.targets.resolve_targets`;
            ``None``: from ``config``, whose defaults are ``"all"`` and every layer). When
            neither is given and ``config`` (if any) keeps the default targets and layers, the
            matrices the experts adapt (every expert must adapt the same ones), so an
            MLP-only expert patches the MLP only; with no experts, ``"all"``.
        config: a :class:`t2fast.config.SVFConfig` (default ``SVFConfig()``): targets, layers,
            ``backend``, ``hybrid``, ``cache_dir``, ``allow_other_model``, the mixture bounds,
            ``mix_in_kernel``, ``keep_dense`` and ``deterministic``.
        progress: show the SVD's progress bar (on a terminal).
        mixture_bounds: limits on every mixture's α (sets ``max_alpha_abs`` / ``max_alpha_l1``).
        **settings: :class:`~t2fast.config.SVFConfig` fields, which replace ``config``'s:
            ``cache_dir`` (default :func:`t2fast.decompose.default_cache_dir`; ``False``
            disables it),
            ``backend`` (``"auto"``, ``"triton"`` or ``"torch"``), ``mix_in_kernel`` (mix each
            row's z from α inside the kernel instead of a per-slot table), ``hybrid`` (serve
            single-mixture batches with dense weights; default True), ``allow_other_model``
            (accept experts trained on another model of equal shapes), ``keep_dense`` (keep
            the original dense weights: the base mixture then runs at dense speed, and
            ``restore()`` is bit for bit. ``False`` drops them once the layers hold U and Vh,
            so the model needs about 1.4× its weights' memory instead of 2.4×: the base
            mixture then runs through the factored kernels).
    Returns:
        An :class:`SVFHandle`; the model starts on the base mixture.
    Raises:
        Everything is checked (targets, SVD, every expert) before the model changes: on an
        error the model is left exactly as it was. An exception while the model is being
        patched (``KeyboardInterrupt`` included) puts the original modules back.
    """
    if any(isinstance(m, SVFLinear) for m in model.modules()):
        raise ValueError("model is already patched; restore() the existing handle first")
    sources = _sources(experts)
    default = SVFConfig()
    if sources and targets is None and layers is None and (
            config is None or (config.targets, config.layers) == (default.targets,
                                                                  default.layers)):
        targets = _expert_targets(model, sources)
    config = SVFConfig.build(config, mixture_bounds, targets=targets, layers=layers, **settings)
    # A backend that cannot run here (no Triton, no CUDA) fails now, before the SVD.
    ops.resolve_backend(config.backend, next((p.device for p in model.parameters()),
                                             torch.device("cpu")))
    decomposition = decompose_model(model, config.targets, config.layers,
                                    cache_dir=config.svd_cache_dir(), progress=progress,
                                    like_weights=True)
    loaded = load_sources(sources, decomposition.factors, Fingerprint.of(decomposition.factors),
                          config.allow_other_model)
    return SVFHandle(model, decomposition, config, loaded)
