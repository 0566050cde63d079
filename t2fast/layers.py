"""``SVFLinear``: an ``nn.Linear`` replacement computing ``y = U (S ⊙ z ⊙ (Vh x)) + b`` per row.

A layer holds its SVD factors and, per step, a slot table: every token of the input belongs to a
batch row, every row to a mixture slot, every slot has a z (or, with ``mix_in_kernel``, an α over
the layer's expert bank). The token → slot map comes from a :class:`RowSlots` object shared by all
layers of a model and set by :class:`t2fast.patch_model.SVFHandle`.

Modes, checked in this order by ``forward``:
    trainable  ``train_z`` is a Parameter [r]: ``W' = U diag(S ⊙ z) Vh`` built differentiably
    merged     ``merged`` holds a dense [m, n] weight (single-mixture fast path)
    factored   the SVF kernels with per-token slots (``t2fast.ops``)
A layer's state dict holds its dense ``weight`` only in merged mode (the weight it serves); in
the other modes saving raises, so a patched model never writes a partial state dict.

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
from .ops import reference
from .targets import FUSED


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class RowSlots:
    """The mixture slot of each batch row, shared by every SVF layer of one model.

    ``slots`` is a long tensor [B] (row → slot) or None when every row uses slot 0;
    ``num_rows`` is the batch size the mixture was set for (B, or None when any batch size may
    follow: one mixture for the whole batch).

    On each device the layers run on, the row → slot map lives in one persistent int32 buffer
    that :meth:`set` overwrites in place (``copy_``), so a forward pass captured in a CUDA graph
    (or compiled) reads whatever mixture is set before each replay. The buffer only grows, by
    reallocation, when a batch has more rows than it holds: capture after the largest batch's
    mixture has been set once (or call :meth:`reserve`).
    """

    def __init__(self, device: torch.device | None = None):
        self.slots: torch.Tensor | None = None
        self.num_rows: int | None = None
        self._buffers: dict[torch.device, torch.Tensor] = {}
        if device is not None:                  # the layers' device: allocated before any step
            self.reserve(1, torch.device(device))

    def set(self, slots: torch.Tensor | None, num_rows: int | None = None) -> None:
        self.slots = None if slots is None else slots.long()
        self.num_rows = int(slots.shape[0]) if slots is not None else num_rows
        for device in list(self._buffers):
            self._write(device, self._buffers[device].numel())

    def reserve(self, rows: int, device: torch.device) -> torch.Tensor:
        """The persistent buffer on ``device``, with room for at least ``rows`` rows."""
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < rows:
            buf = self._write(device, max(rows, 2 * (buf.numel() if buf is not None else 0)))
        return buf

    def _write(self, device: torch.device, capacity: int) -> torch.Tensor:
        """Write the current map into the buffer on ``device`` (reallocated if too small)."""
        n = 0 if self.slots is None else self.slots.shape[0]
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < max(capacity, n):
            buf = torch.zeros(max(capacity, n), dtype=torch.int32, device=device)
            self._buffers[device] = buf
        if self.slots is None:
            buf.zero_()
        else:
            buf[:n].copy_(self.slots.to(torch.int32), non_blocking=True)
            buf[n:].zero_()
        return buf

    def check_rows(self, lead_shape: torch.Size) -> None:
        """Raise unless an input with leading dims ``lead_shape`` has the rows the mixture was
        set for."""
        B = self.num_rows
        if B is not None and (len(lead_shape) == 0 or lead_shape[0] != B):
            raise ValueError(f"the mixture was set for {B} batch rows, but the input has "
                             f"leading shape {tuple(lead_shape)}; call set_mixture(rows=[...]) "
                             f"with one mixture per row of this batch")

    def token_index(self, lead_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Slot of every token (int32 [T]) for an input with leading dims ``lead_shape``
        ([B] or [B, L]): a view of the persistent buffer when L == 1 (decode), else that view
        repeated L times per row."""
        self.check_rows(lead_shape)
        B = lead_shape[0] if len(lead_shape) else 1
        per_row = 1
        for d in lead_shape[1:]:
            per_row *= d
        rows = self.reserve(B, device)[:B]
        return rows if per_row == 1 else rows[:, None].expand(B, per_row).reshape(-1)


class SVFLinear(nn.Module):
    """SVF version of an ``nn.Linear`` (weight [m, n]); see the module docstring.

    Buffers: ``U`` [m, r] and ``Vh`` [r, n] in the original weight's dtype, ``S`` [r] float32,
    ``slot_z`` [capacity, r] float32 (rows ≥ the slots in use are stale), ``bank_z`` [K + 1, r]
    float32 (row 0 = base), ``slot_alpha`` [capacity, K + 1] float32. :meth:`set_slots` writes
    ``slot_z`` and ``slot_alpha`` in place (they only grow), so captured steps see new mixtures.
    """

    def __init__(self, name: str, factors: SVDFactors, linear: nn.Linear, layer: int,
                 rows: RowSlots, backend: str = "auto", mix_in_kernel: bool = False,
                 deterministic: bool = True):
        super().__init__()
        w = linear.weight
        self.name = name
        self.layer = layer
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rows = rows
        self.backend = backend
        self.mix_in_kernel = mix_in_kernel
        self.deterministic = deterministic    # t2fast.ops' keyword (SVFConfig.deterministic)
        self.bias = linear.bias
        r = factors.rank
        self.register_buffer("U", factors.U.to(device=w.device, dtype=w.dtype), persistent=False)
        self.register_buffer("S", factors.S.to(device=w.device, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("Vh", factors.Vh.to(device=w.device, dtype=w.dtype),
                             persistent=False)
        ones = torch.ones(1, r, device=w.device)
        self.register_buffer("slot_z", ones.clone(), persistent=False)
        self.register_buffer("bank_z", ones.clone(), persistent=False)
        self.register_buffer("slot_alpha", torch.ones(1, 1, device=w.device), persistent=False)
        self.merged: torch.Tensor | None = None
        self.train_z: nn.Parameter | None = None

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def set_bank_z(self, bank_z: torch.Tensor) -> None:
        """Expert bank z [K + 1, r] (row 0 must be the base, ones)."""
        self.bank_z = bank_z.to(device=self.S.device, dtype=torch.float32)

    def set_slots(self, alpha: torch.Tensor) -> None:
        """Per-slot α [slots, K + 1] for this layer; the z table is mixed from the bank.

        Both tables are overwritten in place; they are reallocated only when they have too few
        rows, or (``slot_alpha``) when the number of experts changed.
        """
        alpha = alpha.to(device=self.S.device, dtype=torch.float32)
        S = alpha.shape[0]
        if self.slot_z.shape[0] < S:
            self.slot_z = torch.ones(max(S, 2 * self.slot_z.shape[0]), self.rank,
                                     device=self.S.device)
        if self.slot_alpha.shape[0] < S or self.slot_alpha.shape[1] != alpha.shape[1]:
            self.slot_alpha = torch.zeros(max(S, self.slot_z.shape[0]), alpha.shape[1],
                                          device=self.S.device)
        self.slot_alpha[:S].copy_(alpha)
        self.slot_z[:S].copy_(ops.mix_experts(alpha, self.bank_z))

    def merge(self, z: torch.Tensor) -> torch.Tensor:
        """Dense ``W' = U diag(S ⊙ z) Vh`` [m, n] in the layer's dtype."""
        return ops.svf_merge(self.U, self.S, z.to(self.S), self.Vh, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_z is not None:
            w = reference.svf_merge(self.U.float(), self.S, self.train_z, self.Vh.float())
            return F.linear(x, w.to(x.dtype), self.bias)
        # A CUDA graph captures the factored path even where dense weights serve eager calls:
        # it reads the persistent tables that set_mixture rewrites, so it follows every later
        # mixture, whereas a captured dense path would keep its weights and its branch.
        if self.merged is not None and not capturing():
            self.rows.check_rows(x.shape[:-1])
            return F.linear(x, self.merged, self.bias)
        group = getattr(self, "group", None)
        y = None if group is None else group.output_of(self, x)
        if y is not None:
            return y if self.bias is None else y + self.bias
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        idx = self.rows.token_index(lead, x.device)
        if self.mix_in_kernel:
            y = ops.svf_matmul_mix(x2, self.U, self.S, self.Vh, self.slot_alpha, self.bank_z, idx,
                                   backend=self.backend, validate=False,
                                   deterministic=self.deterministic)
        else:
            y = ops.svf_matmul(x2, self.U, self.S, self.Vh, self.slot_z, idx,
                               backend=self.backend, validate=False,
                               deterministic=self.deterministic)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A state dict holds this layer's dense weight only when one exists: the merged (or,
        on the base mixture, original) weight. Per-row and trainable modes have none, so saving
        then raises instead of writing a state dict without the adapted weights."""
        if self.train_z is not None or self.merged is None:
            mode = "trainable z" if self.train_z is not None else "per-row mixtures"
            raise RuntimeError(
                f"{self.name} is an SVF layer serving {mode} and has no dense weight to save; "
                f"call handle.merge(spec) to save the adapted model, or handle.restore() to save "
                f"the original one")
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.merged if keep_vars else self.merged.detach()

    def extra_repr(self) -> str:
        mode = ("trainable" if self.train_z is not None else
                "merged" if self.merged is not None else "factored")
        return (f"{self.name}: in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"slots={self.slot_z.shape[0]}, experts={self.bank_z.shape[0] - 1}, mode={mode}")


class SVFGroup:
    """The :class:`SVFLinear` layers of one decoder layer that read the same input (q/k/v,
    gate/up), run as one grouped op (:func:`t2fast.ops.svf_group`).

    Hugging Face calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one by one with the same
    tensor ``h``. The first member called computes the whole group's output and keeps it; each
    other member, called with that same tensor (same version, same slot tables), takes its
    columns instead of computing; once every member has taken its share the result is dropped.
    In a captured CUDA graph the group thus costs one stacked shrink and one grouped expand (and
    one concatenation of the members' z tables), whichever member runs first. The members' U,
    S and Vh become views of the group's stacked factors (:func:`t2fast.ops.stack_group`), so
    nothing is held twice. Members run alone (their own op) whenever the group cannot serve
    them: a member merged or trainable, a different input, gradients through x, a
    ``torch.compile`` trace, or factors moved off the group's buffers.
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
        tables = [t for m in self.members for t in (m.slot_z, m.slot_alpha, m.bank_z)]
        return (x, x._version, *((id(t), t._version) for t in tables))

    def _serves(self, x: torch.Tensor) -> bool:
        first = self.members[0]
        return (not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad)
                and all(m.train_z is None and (m.merged is None or capturing())
                        and m.backend == first.backend and m.mix_in_kernel == first.mix_in_kernel
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
            y = self._run(x)
            self._key, self._y = self._state(x), y
            self._pending = set(self.members) - {member}
        a, b = self.cols[member]
        return y[..., a:b]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        first = self.members[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, first.in_features)
        idx = first.rows.token_index(lead, x.device)
        Us = [m.U for m in self.members]
        if first.mix_in_kernel:      # one α per layer: every member holds the same slot_alpha
            bank = torch.cat([m.bank_z for m in self.members], dim=1)
            y = ops.svf_group_mix(x2, Us, self.S, self.Vh, first.slot_alpha, bank, idx,
                                  backend=first.backend, validate=False,
                                  deterministic=first.deterministic)
        else:
            Z = torch.cat([m.slot_z for m in self.members], dim=1)
            y = ops.svf_group(x2, Us, self.S, self.Vh, Z, idx, backend=first.backend,
                              validate=False, deterministic=first.deterministic)
        return y.reshape(*lead, y.shape[-1])


def link_groups(modules: dict[str, SVFLinear]) -> list[SVFGroup]:
    """Group the layers of ``modules`` (name → layer) that read one input: the q/k/v and the
    gate/up projections of each decoder layer (:data:`t2fast.targets.FUSED`), when at least two
    of them are adapted and they share dtype, device and input size."""
    found: dict[tuple[str, str], list[SVFLinear]] = {}
    for name, layer in modules.items():
        parent, _, short = name.rpartition(".")
        kind = next((f for f, parts in FUSED.items() if short in parts), None)
        if kind is not None:
            found.setdefault((parent, kind), []).append(layer)
    groups = []
    for members in found.values():
        first = members[0]
        if len(members) > 1 and all(m.U.dtype == first.U.dtype and m.U.device == first.U.device
                                    and m.in_features == first.in_features for m in members):
            groups.append(SVFGroup(members))
    return groups


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


def _fused_state_dict(module: FusedSVF, state: dict, prefix: str, local_metadata) -> None:
    """Replace the parts' entries (``parts.{i}.weight``...) by the fused ``weight``/``bias``."""
    parts = {k[len(prefix):]: state.pop(k) for k in list(state)
             if k.startswith(prefix + "parts.")}
    n = len(module.parts)
    for key in ("weight", "bias"):
        blocks = [parts.get(f"parts.{i}.{key}") for i in range(n)]
        if all(b is not None for b in blocks):
            state[prefix + key] = torch.cat(blocks)
