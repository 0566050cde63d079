"""``SVFLinear``: an ``nn.Linear`` replacement computing ``y = U (S ⊙ z ⊙ (Vh x)) + b`` per row.

A layer holds its SVD factors; everything that changes with the mixtures — the expert bank, the
α table, the slot of every row, the merged weights — lives in the model's
:class:`t2fast.runtime.SVFRuntime` (set by :class:`t2fast.patching.SVFHandle`), which every
layer reads.

Paths, checked in this order by ``forward``:
    trainable  ``train_z`` is a Parameter [r]: ``W' = U diag(S ⊙ z) Vh`` built differentiably
    dense      the runtime's mode is ``"base"`` (the original weight, when kept) or
               ``"merged"`` (the mixture's merged weight, from the runtime's merge cache)
    factored   the SVF kernels with per-token slots (``t2fast.ops``)
A layer's state dict holds its dense ``weight`` only when a dense path serves (the weight it
serves); otherwise saving raises, so a patched model never writes a partial state dict.

:class:`SVFGroup` runs the layers that read one input (q/k/v, gate/up) as one grouped op
(:func:`link_groups` forms the groups of a patched model).

:class:`FusedSVF` stands for a fused projection (Phi-3's ``qkv_proj``): the concatenation of its
logical parts, each an ``SVFLinear`` or a :func:`row_block` view of the original weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .decompose import SVDFactors
from .ops.reference import svf_merge_reference
from .targets import FUSED


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SVFLinear(nn.Module):
    """SVF version of an ``nn.Linear`` (weight [m, n]); see the module docstring.

    Buffers: ``U`` [m, r] and ``Vh`` [r, n] in the original weight's dtype, ``S`` [r] float32.
    ``dense`` is the original weight (None once dropped: ``keep_dense=False``); ``runtime`` the
    model's :class:`t2fast.runtime.SVFRuntime` (set by the handle).
    """

    def __init__(self, name: str, factors: SVDFactors, linear: nn.Linear, layer: int,
                 backend: str = "auto", deterministic: bool = True):
        super().__init__()
        w = linear.weight
        self.name = name
        self.layer = layer
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.runtime = None
        self.backend = backend
        self.deterministic = deterministic    # t2fast.ops' keyword (SVFConfig.deterministic)
        self.bias = linear.bias
        self.dense: torch.Tensor | None = w.detach()
        self.register_buffer("U", factors.U.to(device=w.device, dtype=w.dtype), persistent=False)
        self.register_buffer("S", factors.S.to(device=w.device, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("Vh", factors.Vh.to(device=w.device, dtype=w.dtype),
                             persistent=False)
        self.train_z: nn.Parameter | None = None

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def bank_z(self) -> torch.Tensor:
        """This matrix's expert bank [max_experts + 1, r] float32 (row 0 the base)."""
        return self.runtime.bank.bank_z(self.name)

    def merge(self, z: torch.Tensor) -> torch.Tensor:
        """Dense ``W' = U diag(S ⊙ z) Vh`` [m, n] in the layer's dtype."""
        return ops.svf_merge(self.U, self.S, z.to(self.S), self.Vh, backend=self.backend)

    def dense_weight(self) -> torch.Tensor | None:
        """The dense weight serving the runtime's mode (``"base"``: the original one, if kept;
        ``"merged"``: the mixture's merged one), or None: the factored path serves."""
        rt = self.runtime
        if rt.mode == "base":
            return self.dense
        if rt.mode == "merged":
            return rt.merged(self.name, lambda z_of: self.merge(z_of(self.name)))
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_z is not None:
            w = svf_merge_reference(self.U.float(), self.S, self.train_z, self.Vh.float())
            return F.linear(x, w.to(x.dtype), self.bias)
        # A CUDA graph captures the factored path even where dense weights serve eager calls:
        # it reads the runtime's persistent tables, so it follows every later mixture, whereas
        # a captured dense path would keep its weights and its branch.
        w = None if capturing() else self.dense_weight()
        if w is not None:
            self.runtime.check_rows(x.shape[:-1])
            return F.linear(x, w, self.bias)
        group = getattr(self, "group", None)
        y = None if group is None else group.output_of(self, x)
        if y is None:
            lead = x.shape[:-1]
            y = svf_apply(self.runtime, [self], self.U, self.S, self.Vh,
                          x.reshape(-1, self.in_features), lead, group=False)
            y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A state dict holds this layer's dense weight only when one serves: the merged (or,
        on the base mixture, original) weight. Per-row and trainable modes have none, so saving
        then raises instead of writing a state dict without the adapted weights."""
        w = None if self.train_z is not None else self.dense_weight()
        if w is None and self.train_z is None and self.runtime.mode == "base":
            raise RuntimeError(
                f"{self.name} is an SVF layer whose original weight was dropped "
                f"(keep_dense=False); handle.restore() rebuilds it from the factors, "
                f"handle.merge(spec) saves an adapted model")
        if w is None:
            mode = "trainable z" if self.train_z is not None else "per-row mixtures"
            raise RuntimeError(
                f"{self.name} is an SVF layer serving {mode} and has no dense weight to save; "
                f"call handle.merge(spec) to save the adapted model, or handle.restore() to save "
                f"the original one")
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        refuse_weight(self.name, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        if self.runtime is not None:        # patched: a submodule's cast reaches here first
            check_placement([self], fn)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        mode = ("trainable" if self.train_z is not None else
                self.runtime.mode if self.runtime is not None else "unpatched")
        return (f"{self.name}: in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"mode={mode}")


def check_placement(layers, fn) -> None:
    """Raise RuntimeError if the ``_apply`` function ``fn`` (of ``to``, ``half``, ``cuda``
    ...) would change the dtype or device of the factors of patched ``layers``: their
    runtime's tables, merged weights and original weights stay where patching placed them."""
    seen = {}
    for layer in layers:
        seen.setdefault((layer.U.device, layer.U.dtype), layer.U)
    for probe in seen.values():
        moved = fn(probe)
        if moved.dtype != probe.dtype or moved.device != probe.device:
            raise RuntimeError(
                f"t2fast: this model was patched on {probe.device} in {probe.dtype}; moving or "
                f"casting it (to {moved.device}, {moved.dtype}) would leave the expert tables, "
                f"merged weights and original weights behind. Move or cast the model before "
                f"patch_model, or handle.restore(), move it and patch again (the SVD cache "
                f"makes that cheap)")


def refuse_weight(name: str, state_dict: dict, prefix: str) -> None:
    """Refuse a weight loaded into a patched layer: it would not reach the SVD factors, the
    expert tables or the merged weights (and ``strict=False`` would drop it silently)."""
    if prefix + "weight" in state_dict:
        raise RuntimeError(f"{name} is an SVF layer: a weight loaded into a patched model would "
                           f"not reach its SVD factors; load the weights before patch_model, or "
                           f"handle.restore() first")


def svf_apply(rt, members: list[SVFLinear], U, S, Vh, x2: torch.Tensor, lead: torch.Size,
              group: bool) -> torch.Tensor:
    """The factored path of one matrix (``group=False``: ``U``, ``S``, ``Vh`` its own) or of a
    group (``U`` the members' U list, ``S``/``Vh`` stacked) through :mod:`t2fast.ops`, with the
    runtime's tables: x2 [T, n] → [T, Σ m]."""
    first = members[0]
    idx = rt.token_slots(lead, x2.device)
    g = rt.bank.group_of(first.name)
    kw = dict(backend=first.backend, validate=False, deterministic=first.deterministic)
    if rt.mix_in_kernel:
        alpha = rt.layer_alpha(first.name)
        bank = rt.bank.tables[g] if group else first.bank_z
        op = ops.svf_group_mix if group else ops.svf_matmul_mix
        return op(x2, U, S, Vh, alpha, bank, idx, **kw)
    Z = rt.group_slot_z(g)
    if not group:
        _, a, b = rt.bank.slice_of(first.name)
        Z = Z[:, a:b]
    op = ops.svf_group if group else ops.svf_matmul
    return op(x2, U, S, Vh, Z, idx, **kw)


class SVFGroup:
    """The :class:`SVFLinear` layers of one decoder layer that read the same input (q/k/v,
    gate/up), run as one grouped op (:func:`t2fast.ops.svf_group`).

    Hugging Face calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one by one with the same
    tensor ``h``. The first member called computes the whole group's output and keeps it; each
    other member, called with that same tensor (same version, same runtime tables), takes its
    columns instead of computing; once every member has taken its share the result is dropped.
    In a captured CUDA graph the group thus costs one stacked shrink and one grouped expand,
    whichever member runs first; the members' z tables are one stacked table of the runtime.
    The members' U, S and Vh become views of the group's stacked factors
    (:func:`t2fast.ops.stack_group`), so nothing is held twice. Members run alone (their own
    op) whenever the group cannot serve them: a member on a dense path or trainable, a
    different input, gradients through x, a ``torch.compile`` trace, or factors moved off the
    group's buffers.
    """

    def __init__(self, members: list[SVFLinear]):
        self.members = members
        Us, self.S, self.Vh = ops.stack_group([m.U for m in members], [m.S for m in members],
                                              [m.Vh for m in members])
        self.cols, at, col = {}, 0, 0
        for m, U in zip(members, Us):
            r = m.rank
            m.U, m.S, m.Vh = U, self.S[at:at + r], self.Vh[at:at + r]
            m.group = self
            self.cols[m] = (col, col + m.out_features)
            at, col = at + r, col + m.out_features
        self._pending: set = set()
        self._key = self._y = None

    def _state(self, x: torch.Tensor) -> tuple:
        rt = self.members[0].runtime
        tables = [rt.alpha, rt.slot_map, *rt.bank.tables, *rt.slot_z]
        return (x, x._version, *((id(t), t._version) for t in tables))

    def _serves(self, x: torch.Tensor) -> bool:
        first = self.members[0]
        return (not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad)
                and all(m.train_z is None and (capturing() or m.dense_weight() is None)
                        and m.backend == first.backend
                        and m.deterministic == first.deterministic
                        and m.Vh.untyped_storage().data_ptr()
                        == self.Vh.untyped_storage().data_ptr() for m in self.members))

    def output_of(self, member: SVFLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` (no bias) from the group, or None: run it alone."""
        if not self._serves(x):
            return None
        if self._key is not None and member in self._pending and \
                self._key[0] is x and self._key[1:] == self._state(x)[1:]:
            self._pending.discard(member)
            y = self._y
            if not self._pending:
                self._key = self._y = None
        else:
            first = self.members[0]
            lead = x.shape[:-1]
            y = svf_apply(first.runtime, self.members, [m.U for m in self.members], self.S,
                          self.Vh, x.reshape(-1, first.in_features), lead, group=True)
            y = y.reshape(*lead, y.shape[-1])
            self._key, self._y = self._state(x), y
            self._pending = set(self.members) - {member}
        a, b = self.cols[member]
        return y[..., a:b]


def group_members(modules: dict[str, SVFLinear]) -> list[list[SVFLinear]]:
    """The layers of ``modules`` (name → layer) as groups that read one input: the q/k/v and
    the gate/up projections of each decoder layer (:data:`t2fast.targets.FUSED`), when they
    share dtype, device and input size; every other layer alone. In model order."""
    found: dict[tuple[str, str], list[SVFLinear]] = {}
    for name, layer in modules.items():
        parent, _, short = name.rpartition(".")
        kind = next((f for f, parts in FUSED.items() if short in parts), name)
        found.setdefault((parent, kind), []).append(layer)
    groups = []
    for members in found.values():
        first = members[0]
        if all(m.U.dtype == first.U.dtype and m.U.device == first.U.device
               and m.in_features == first.in_features for m in members):
            groups.append(members)
        else:
            groups.extend([m] for m in members)
    return groups


def link_groups(groups: list[list[SVFLinear]]) -> list[SVFGroup]:
    """An :class:`SVFGroup` for every group of at least two layers."""
    return [SVFGroup(members) for members in groups if len(members) > 1]


def row_block(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """An ``nn.Linear`` computing rows ``start:stop`` of ``linear``'s output; its weight and bias
    are views of ``linear``'s (no copy)."""
    block = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None,
                      device="meta")
    block.weight = nn.Parameter(linear.weight[start:stop], linear.weight.requires_grad)
    if linear.bias is not None:
        block.bias = nn.Parameter(linear.bias[start:stop], linear.bias.requires_grad)
    return block


class FusedSVF(nn.Module):
    """A fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) whose logical matrices are
    adapted separately: ``y = concat_i part_i(x)`` over the output dimension.

    ``parts`` are :class:`SVFLinear` layers for adapted matrices and :func:`row_block` views for
    the others. Its state dict holds the fused ``weight`` [out, in] (and ``bias``), built from
    the parts' dense weights, so a merged model saves in the original layout.
    """

    def __init__(self, name: str, parts: list[nn.Module]):
        super().__init__()
        self.name = name
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_state_dict_post_hook(_fused_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        refuse_weight(self.name, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _fused_state_dict(module: FusedSVF, state: dict, prefix: str, local_metadata) -> None:
    """Replace the parts' entries (``parts.{i}.weight``...) by the fused ``weight``/``bias``."""
    parts = {k[len(prefix):]: state.pop(k) for k in list(state)
             if k.startswith(prefix + "parts.")}
    n = len(module.parts)
    for key in ("weight", "bias"):
        blocks = [parts.get(f"parts.{i}.{key}") for i in range(n)]
        if all(b is not None for b in blocks):
            state[prefix + key] = torch.cat(blocks)
