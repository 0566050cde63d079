"""The SVF runtime: what every SVF layer of one model reads at run time, for Hugging Face and
vLLM alike.

One :class:`SVFRuntime` per model instance owns

* the **expert bank** (:class:`ExpertBank`): a fixed number of rows, expert name → row (row 0
  is the base model, z = 1; unloading an expert leaves its row free), and per adapted matrix a
  z table ``[capacity + 1, r]`` float32. The matrices of one group (q/k/v, gate/up: they read
  one input) share one stacked table ``[capacity + 1, R]``; each matrix's table is a view of
  its columns;
* the **α table** ``alpha`` ``[num_layers, slots, capacity + 1]`` float32: one row of α per
  decoder layer and slot; slot 0 is the base model, each other distinct mixture of the step
  gets a slot (deduplicated here);
* with ``mix_in_kernel=False``, per group the **slot z table** ``[slots, R]`` float32, mixed
  from α and the bank by :meth:`SVFRuntime.mix` — the one place where α becomes z outside the
  kernels (the merged weights use it too);
* the **slot map** ``slot_map`` int32: the slot of every batch row (Hugging Face: tokens repeat
  their row's slot) or of every token (vLLM);
* the **mode** of the step (:data:`MODES`) and the **merge cache** (:class:`MergeCache`: dense
  merged weights per mixture within a byte budget);
* one set of **statistics** (:data:`STATS`).

Every table is overwritten in place (``copy_``), so a captured CUDA graph or a compiled graph
reads each step's values. Tables sized by the batch (slots, rows) grow by reallocation when
``max_slots`` / ``max_rows`` are not fixed: capture after the largest batch has been set once.

The adapters are thin: :class:`t2fast.patching.SVFHandle` with :class:`t2fast.layers.
SVFLinear` (Hugging Face) and :class:`t2fast.vllm.runner.T2Runtime` with :class:`t2fast.vllm.
layers.SVFLinearMethod` (vLLM) set mixtures here and call :mod:`t2fast.ops` with these tables.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import ops
from .experts import Expert, Fingerprint, check_unique_names, load_expert
from .mixtures import MixtureBounds, parse_mixture

#: What serves a step: every row on the base model (dense original weights where the adapter
#: holds them), every row on one other mixture (dense merged weights), or the factored kernels.
MODES = ("base", "merged", "factored")
#: The statistics of every runtime: how often each mode was chosen (per ``set_*`` call in
#: Hugging Face, per step in vLLM), mixtures merged, merge-cache hits and evictions, and
#: single-mixture batches served factored because their merged weights exceed the budget.
#: Every table of the runtime is float32 whatever torch's default dtype (vLLM loads a bf16
#: checkpoint with the default dtype set to bf16).
F32 = torch.float32
STATS = MODES + ("merges", "merge_cache_hits", "merge_evictions", "merge_over_budget")


def check_bank_load(loaded: Sequence[str], names: Sequence[str], capacity: int,
                    replace: bool, hint: str = "pass replace=True") -> None:
    """Raise ``ValueError`` unless experts ``names`` may be loaded into a bank of ``capacity``
    rows holding ``loaded``: unique names, none already loaded unless ``replace`` (``hint``
    says how to ask for it), and room for the new ones. The one check of the workers' banks,
    the Hugging Face handle, the vLLM front end and the server."""
    check_unique_names(list(names))
    clash = [n for n in names if n in loaded]
    if clash and not replace:
        raise ValueError(f"experts {clash} are already loaded (loaded: {list(loaded)}); "
                         f"{hint} to replace them")
    new = [n for n in names if n not in loaded]
    if len(loaded) + len(new) > capacity:
        raise ValueError(f"the expert bank holds {capacity} experts (max_experts); "
                         f"{len(loaded)} are loaded and {len(new)} more were given: unload "
                         f"some, or load the model with a larger max_experts")


def load_sources(sources: Sequence, factors: dict, fingerprint: Fingerprint | None,
                 allow_other_model: bool) -> list[Expert]:
    """Load (file/folder paths) and check (:class:`Expert` objects) every expert against the
    decomposition ``factors``; raises on the first bad one, before anything changes."""
    out = []
    for e in sources:
        if isinstance(e, Expert):
            e.check_against(factors, fingerprint, allow_other_model)
        else:
            e = load_expert(e, factors, allow_other_model)
        out.append(e)
    check_unique_names([e.name for e in out])
    return out


class ExpertBank:
    """Experts over the same targets with a fixed number of rows; row 0 is the base (z = 1).

    Args:
        capacity: the most experts loaded at once.
        device: where the tables live.
    The adapted matrices are added as groups (:meth:`add_group`) before experts are loaded.
    Attributes:
        names: loaded experts, in bank order (the order of α lists).
        row_of: ``{name: row}`` (rows 1..capacity; not necessarily dense after unloading).
        experts: ``{name: Expert}`` of the loaded experts.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.names: list[str] = []
        self.row_of: dict[str, int] = {}
        self.experts: dict[str, Expert] = {}
        self.tables: list[torch.Tensor] = []           # per group [capacity + 1, R]
        self._where: dict[str, tuple[int, int, int]] = {}   # target -> (group, start, stop)

    def add_group(self, members: Sequence[tuple[str, int]], device=None) -> int:
        """Add the z tables of matrices ``[(target, rank r), ...]`` that read one input,
        stacked into one ``[capacity + 1, R]`` table (R = Σ r) on ``device`` (default: the
        bank's); returns the group's index."""
        if self.names:
            raise RuntimeError("t2fast: matrices are added to the bank before any expert")
        R = sum(r for _, r in members)
        table = torch.zeros(self.capacity + 1, R, dtype=F32,
                            device=self.device if device is None else device)
        table[0] = 1.0
        at = 0
        for name, r in members:
            self._where[name] = (len(self.tables), at, at + r)
            at += r
        self.tables.append(table)
        return len(self.tables) - 1

    def __len__(self) -> int:
        return len(self.names)

    def bank_z(self, target: str) -> torch.Tensor:
        """z of ``target`` [capacity + 1, r] float32 (a view of its group's table): row 0 the
        base (ones), row ``row_of[name]`` each expert, free rows zero."""
        g, a, b = self._where[target]
        return self.tables[g][:, a:b]

    def slice_of(self, target: str) -> tuple[int, int, int]:
        """``(group, start, stop)``: ``target``'s columns in its group's stacked table."""
        return self._where[target]

    def group_of(self, target: str) -> int:
        return self._where[target][0]

    def load(self, experts: Sequence[Expert], replace: bool = False) -> None:
        """Write ``experts`` (checked against the targets) into free rows; a loaded name is an
        error unless ``replace`` (the new expert then takes its row). All or nothing."""
        check_bank_load(self.names, [e.name for e in experts], self.capacity, replace)
        for e in experts:
            missing = [t for t in self._where if t not in e.z]
            if missing:
                raise ValueError(f"expert {e.name!r} has no z for {missing[:3]}")
        for e in experts:
            row = self.row_of.get(e.name)
            if row is None:
                used = set(self.row_of.values())
                row = next(r for r in range(1, self.capacity + 1) if r not in used)
                self.row_of[e.name] = row
                self.names.append(e.name)
            self.experts[e.name] = e
            for t in self._where:
                self.bank_z(t)[row].copy_(e.z[t].to(dtype=torch.float32))

    def unload(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.row_of]
        if unknown:
            raise ValueError(f"cannot unload {unknown}: not loaded (loaded: "
                             f"{self.names or '(none)'})")
        for n in names:
            row = self.row_of.pop(n)
            self.names.remove(n)
            del self.experts[n]
            for table in self.tables:
                table[row].zero_()


class MergeBudgetError(ValueError):
    """Dense weights were required (an explicit merge, a policy's weights) but exceed the
    merge cache's byte budget."""


class MergeCache:
    """Dense merged weights per mixture, least recently used first out, within a byte budget.

    An entry is one mixture's weights, ``{unit: tensor}`` (a unit is what an adapter merges:
    one matrix in Hugging Face, one fused vLLM layer), filled as the adapter builds them.
    ``budget`` is in bytes; ``None`` is resolved, at the first merge, to half the free memory of
    the device the weights live on (:func:`free_bytes`).
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.entries: OrderedDict[bytes, dict[str, torch.Tensor]] = OrderedDict()

    @property
    def used(self) -> int:
        return sum(_nbytes(w) for e in self.entries.values() for w in e.values())

    def resolve_budget(self, device: torch.device) -> int:
        if self.budget is None:
            self.budget = free_bytes(device) // 2
        return self.budget

    def clear(self) -> None:
        self.entries.clear()


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class SVFRuntime:
    """The run-time state of one model's SVF layers (see the module docstring).

    Args:
        num_layers: decoder layers (rows of the α table).
        capacity: expert bank rows (``max_experts``).
        device: where the tables live.
        bounds: :class:`t2fast.mixtures.MixtureBounds` of every mixture.
        hybrid: choose ``"base"``/``"merged"`` for single-mixture batches (else always
            ``"factored"``).
        mix_in_kernel: the layers mix z from α in the kernel (no slot z tables here).
        merge_cache_bytes: the merge cache's budget (:class:`MergeCache`).
        max_slots, max_rows: fixed table sizes (vLLM: ``max_num_seqs + 1``,
            ``max_num_batched_tokens``); ``None`` grows them with the batch.
    The adapted matrices are added with :meth:`add_group` before experts are loaded.
    """

    def __init__(self, num_layers: int, *, capacity: int, device, bounds: MixtureBounds,
                 hybrid: bool, mix_in_kernel: bool, merge_cache_bytes: int | None = None,
                 max_slots: int | None = None, max_rows: int | None = None):
        self.device = torch.device(device)
        self.num_layers = int(num_layers)
        self.bounds = bounds
        self.hybrid = bool(hybrid)
        self.mix_in_kernel = bool(mix_in_kernel)
        self.layer_of: dict[str, int] = {}
        self.groups: list[list[tuple[str, int]]] = []
        self.bank = ExpertBank(capacity, self.device)
        self.merge_cache = MergeCache(merge_cache_bytes)
        self.merged_bytes = 0          # bytes of one mixture's merged weights (set by adapters)
        self.fixed_slots, self.fixed_rows = max_slots is not None, max_rows is not None
        self.alpha = torch.zeros(self.num_layers, max_slots or 2, capacity + 1, dtype=F32,
                                 device=self.device)
        self.alpha[:, :, 0] = 1.0
        self.slot_z: list[torch.Tensor] = []   # per group [slots, R] (mix_in_kernel=False)
        self.slot_map = torch.zeros(max_rows or 1, dtype=torch.int32, device=self.device)
        self.num_rows: int | None = None       # rows the batch must have (None: any)
        self.mode = "base"
        self.merge_key: bytes | None = None    # the merged mixture (mode "merged")
        self.generation = 0                    # bumped whenever the bank changes
        self._fill = 0
        self._mirrors: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._slot_keys: tuple = ()
        self.stats = dict.fromkeys(STATS, 0)

    def add_group(self, members: Sequence[tuple[str, int]], layer: int, device=None) -> int:
        """Add matrices ``[(target, rank r), ...]`` of decoder layer ``layer`` that read one
        input (one matrix alone is a group too), whose layers run on ``device`` (default: the
        runtime's; a model split over devices gets mirrors of the α table and the slot map on
        each, refreshed with every write); returns the group's index."""
        g = self.bank.add_group(members, device)
        self.groups.append(list(members))
        for name, _ in members:
            self.layer_of[name] = min(int(layer), self.num_layers - 1)
        if not self.mix_in_kernel:
            self.slot_z.append(torch.ones(self.alpha.shape[1], self.bank.tables[g].shape[1],
                                          dtype=F32, device=self.bank.tables[g].device))
        return g

    # ---- experts ---------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return list(self.bank.names)

    def load_experts(self, experts: Sequence[Expert], replace: bool = False) -> list[str]:
        """Load checked experts into the bank (:meth:`ExpertBank.load`); every mixture is
        reset to the base model. Returns the bank order."""
        self.bank.load(experts, replace)
        self._bank_changed()
        return self.expert_names

    def unload_experts(self, names: Sequence[str]) -> list[str]:
        self.bank.unload(list(names))
        self._bank_changed()
        return self.expert_names

    def _bank_changed(self) -> None:
        self.generation += 1
        self.merge_cache.clear()
        self._slot_keys = ()
        self.set_batch_mixture(self.base_alpha())

    # ---- mixtures --------------------------------------------------------------------------
    def base_alpha(self) -> torch.Tensor:
        a = torch.zeros(self.num_layers, self.bank.capacity + 1, dtype=F32)
        a[:, 0] = 1.0
        return a

    def alpha_of(self, spec) -> torch.Tensor:
        """α float32 [num_layers, capacity + 1] (column 0 the base, column ``row_of[name]`` each
        expert) of a mixture spec (:func:`t2fast.mixtures.parse_mixture`, in bank order)."""
        return self.place(parse_mixture(spec, self.bank.names, self.num_layers, self.bounds))

    def place(self, alpha: torch.Tensor) -> torch.Tensor:
        """α [num_layers, K + 1] in bank order → [num_layers, capacity + 1] in bank rows."""
        out = torch.zeros(self.num_layers, self.bank.capacity + 1, dtype=F32)
        out[:, 0] = alpha[:, 0]
        for k, name in enumerate(self.bank.names):
            out[:, self.bank.row_of[name]] = alpha[:, 1 + k]
        return out

    def set_batch_mixture(self, alpha: torch.Tensor, dense: bool | None = None) -> str:
        """One mixture (α [num_layers, capacity + 1]) for every row of any batch. ``dense``:
        ``None`` lets ``hybrid`` choose the path, ``True`` asks for dense weights (base or
        merged, within the merge budget), ``False`` for the factored kernels."""
        return self._set([alpha], None, fixed_rows=False, dense=dense)

    def set_batch_weights(self, key: bytes) -> str:
        """Dense weights that come from no mixture of the bank (explicit z vectors: a policy
        being trained) for every row of any batch: mode ``"merged"`` under ``key``, whose entry
        the adapter fills (:meth:`merged`). The α table and the slot map hold the base model
        (a captured factored path serves it). Only the latest such weights stay cached.
        Raises when the weights exceed the budget."""
        key = b"weights:" + key
        for old in [k for k in self.merge_cache.entries if k.startswith(b"weights:")]:
            if old != key:                  # explicit weights change often: keep the latest
                del self.merge_cache.entries[old]
        self._write_map([], fill=0)
        self.num_rows = None
        self.mode = self._merged_or_factored(key, required=True)
        self.stats[self.mode] += 1
        return self.mode

    def set_row_mixtures(self, alphas: Sequence[torch.Tensor | None],
                         repeat: Sequence[int] | None = None, fixed_rows: bool = True) -> str:
        """One mixture per entry (``None``: the base model): per batch row, or per request with
        ``repeat`` (its token count: the slot map then holds one slot per token, and tokens past
        them, padding, use the base model). ``fixed_rows``: every batch must then have exactly
        ``len(alphas)`` rows (:meth:`check_rows`)."""
        return self._set(list(alphas), repeat, fixed_rows)

    def _set(self, alphas: list, repeat, fixed_rows: bool, dense: bool | None = None) -> str:
        """Deduplicate the mixtures into slots, write the α table, the slot z tables and the
        slot map, and choose the mode. Returns the mode."""
        base = self.base_alpha().numpy().tobytes()
        keys, slot_alphas, slots = {base: 0}, [], []
        for a in alphas:
            k = base if a is None else a.numpy().tobytes()
            if k not in keys:
                keys[k] = len(keys)
                slot_alphas.append(a)
            slots.append(keys[k])
        distinct = set(slots)
        if dense is False or (dense is None and not self.hybrid) or len(distinct) > 1:
            mode = "factored"
        elif distinct <= {0}:                        # no rows, or every row on the base
            mode = "base"
        else:
            mode = self._merged_or_factored(tuple(keys)[1], required=bool(dense))
        self._write_slots(tuple(keys)[1:], slot_alphas)
        batch_wide = not fixed_rows and repeat is None
        if batch_wide:                                   # any number of rows: fill with it
            self._write_map([], fill=slots[0])
        else:
            rows = np.asarray(slots, dtype=np.int32)
            if repeat is not None:
                rows = np.repeat(rows, np.asarray(repeat, dtype=np.int64))
            self._write_map(rows, fill=0)
        self.num_rows = len(alphas) if fixed_rows else None
        if mode != "merged":
            self.merge_key = None
        self.mode = mode
        self.stats[mode] += 1
        return mode

    def _merged_or_factored(self, key: bytes, required: bool = False) -> str:
        cache = self.merge_cache
        budget = cache.resolve_budget(self.device)
        if self.merged_bytes > budget:
            if required:
                raise MergeBudgetError(f"t2fast: merged weights need {self.merged_bytes} bytes, "
                                       f"more than the merge cache's budget of {budget} bytes "
                                       f"(merge_cache_bytes)")
            self.stats["merge_over_budget"] += 1
            return "factored"
        self.merge_key = key
        if key in cache.entries:
            cache.entries.move_to_end(key)
            self.stats["merge_cache_hits"] += 1
        else:
            while cache.entries and cache.used + self.merged_bytes > budget:
                cache.entries.popitem(last=False)
                self.stats["merge_evictions"] += 1
            cache.entries[key] = {}
            self.stats["merges"] += 1
        return "merged"

    def _write_slots(self, keys: tuple, alphas: list) -> None:
        """α of slots 1..len(keys), and their slot z tables; skipped when unchanged."""
        n = len(keys) + 1
        if n > self.alpha.shape[1]:
            if self.fixed_slots:
                raise RuntimeError(f"t2fast: {n - 1} distinct mixtures in one step, more than "
                                   f"the {self.alpha.shape[1] - 1} slots")
            self._grow_slots(max(n, 2 * self.alpha.shape[1]))
        if (self.generation, keys) == self._slot_keys:
            return
        self._slot_keys = (self.generation, keys)
        if not alphas:
            return
        table = torch.stack(alphas, dim=1).to(self.device)       # [L, n - 1, capacity + 1]
        _copy(self.alpha[:, 1:n], table)
        self._refresh("alpha")
        if not self.mix_in_kernel:
            for g, members in enumerate(self.groups):
                bank = self.bank.tables[g]
                alpha = self.on("alpha", bank.device)[self.layer_of[members[0][0]], 1:n]
                self.slot_z[g][1:n].copy_(self.mix(alpha, bank))

    def _grow_slots(self, slots: int) -> None:
        alpha = torch.zeros(self.num_layers, slots, self.alpha.shape[2], dtype=F32,
                            device=self.device)
        alpha[:, :, 0] = 1.0
        alpha[:, :self.alpha.shape[1]] = self.alpha
        self.alpha = alpha
        self._refresh("alpha")
        self.slot_z = [torch.cat([z, torch.ones(slots - z.shape[0], z.shape[1], dtype=F32,
                                                device=z.device)]) for z in self.slot_z]

    def _write_map(self, rows, fill: int) -> None:
        """Write ``rows`` (one slot per row or token) at the head of the slot map and ``fill``
        everywhere after them."""
        n = len(rows)
        if n > self.slot_map.numel():
            if self.fixed_rows:
                raise RuntimeError(f"t2fast: step has {n} tokens, more than the "
                                   f"{self.slot_map.numel()} the slot map holds "
                                   f"(max_num_batched_tokens)")
            self.slot_map = torch.zeros(max(n, 2 * self.slot_map.numel()), dtype=torch.int32,
                                        device=self.device)
        if n:
            _copy(self.slot_map[:n], torch.from_numpy(np.ascontiguousarray(rows, np.int32)))
        self.slot_map[n:].fill_(fill)
        self._fill = fill
        self._refresh("slot_map")

    def reserve(self, rows: int) -> None:
        """Room in the slot map for ``rows`` rows (before capturing a graph of that batch)."""
        if rows > self.slot_map.numel():
            old = self.slot_map
            self.slot_map = torch.full((max(rows, 2 * old.numel()),), self._fill,
                                       dtype=torch.int32, device=self.device)
            self.slot_map[:old.numel()].copy_(old)
            self._refresh("slot_map")

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """The table ``name`` (``"alpha"`` or ``"slot_map"``) on ``device``: the runtime's
        own, or a persistent mirror of it (a model split over devices), refreshed with every
        write so captured steps there follow it too."""
        table = getattr(self, name)
        if device == table.device:
            return table
        mirror = self._mirrors.get((name, device))
        if mirror is None or mirror.shape != table.shape:
            mirror = self._mirrors[(name, device)] = table.to(device)
        return mirror

    def _refresh(self, name: str) -> None:
        table = getattr(self, name)
        for (which, device), mirror in list(self._mirrors.items()):
            if which != name:
                continue
            if mirror.shape == table.shape:
                mirror.copy_(table, non_blocking=True)
            else:
                self._mirrors[(which, device)] = table.to(device)

    # ---- what the layers read --------------------------------------------------------------
    def check_rows(self, lead_shape: torch.Size) -> None:
        """Raise unless an input with leading dims ``lead_shape`` has the rows the mixtures
        were set for."""
        B = self.num_rows
        if B is not None and (len(lead_shape) == 0 or lead_shape[0] != B):
            more = ""
            if len(lead_shape) and lead_shape[0] > B and lead_shape[0] % B == 0:
                k = lead_shape[0] // B
                more = (f" (if this comes from generate's num_beams / num_return_sequences, "
                        f"which repeat each row {k} times in a row: give each mixture {k} "
                        f"times, [m for m in mixtures for _ in range({k})])")
            raise ValueError(f"the mixture was set for {B} batch rows, but the input has "
                             f"leading shape {tuple(lead_shape)}; call set_mixture(rows=[...]) "
                             f"with one mixture per row of this batch{more}")

    def token_slots(self, lead_shape: torch.Size, device: torch.device | None = None
                    ) -> torch.Tensor:
        """Slot of every token (int32 [T], on ``device``: default the runtime's) of an input
        with leading dims ``lead_shape`` ([T], [B] or [B, L]): a view of the slot map when
        every row is one token, else each row's slot repeated L times."""
        self.check_rows(lead_shape)
        B = lead_shape[0] if len(lead_shape) else 1
        per_row = 1
        for d in lead_shape[1:]:
            per_row *= d
        self.reserve(B)
        rows = self.on("slot_map", device or self.device)[:B]
        return rows if per_row == 1 else rows[:, None].expand(B, per_row).reshape(-1)

    def layer_alpha(self, target: str) -> torch.Tensor:
        """α of every slot [slots, capacity + 1] at ``target``'s decoder layer, on the device
        of its bank table."""
        return self.on("alpha", self.bank.bank_z(target).device)[self.layer_of[target]]

    def group_slot_z(self, group: int) -> torch.Tensor:
        """The slot z table of a group [slots, R] (``mix_in_kernel=False`` only)."""
        return self.slot_z[group]

    @staticmethod
    def mix(alpha: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """z [slots, r] = α [slots, capacity + 1] @ bank [capacity + 1, r]: the one place α
        becomes z outside the kernels."""
        return ops.mix_experts(alpha, bank)

    def merged(self, unit: str, build: Callable[[Callable[[str], torch.Tensor]], torch.Tensor]
               ) -> torch.Tensor:
        """The merged weight of ``unit`` for the step's mixture (mode ``"merged"``), built on
        first use by ``build(z_of)``, where ``z_of(target)`` is that target's mixed z [r]."""
        entry = self.merge_cache.entries.get(self.merge_key)
        if entry is None:
            raise RuntimeError("t2fast: merged weights asked for outside a merged step")
        w = entry.get(unit)
        if w is None:
            w = entry[unit] = build(self._single_z)
        return w

    def _single_z(self, target: str) -> torch.Tensor:
        """z [r] of ``target`` for the merged mixture (slot 1)."""
        bank = self.bank.bank_z(target)
        alpha = self.on("alpha", bank.device)[self.layer_of[target], 1:2]
        return self.mix(alpha, bank)[0]

    # ---- reports ---------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes of the runtime's tables and of the merge cache, and the cache's budget."""
        return dict(bank=_nbytes(*self.bank.tables), alpha=_nbytes(self.alpha),
                    slot_z=_nbytes(*self.slot_z), slot_map=_nbytes(self.slot_map),
                    merged=self.merge_cache.used, merge_budget=self.merge_cache.budget,
                    merged_per_mixture=self.merged_bytes)

    def info(self) -> dict:
        return dict(experts=self.expert_names, max_experts=self.bank.capacity,
                    num_layers=self.num_layers, hybrid=self.hybrid, mode=self.mode,
                    stats=dict(self.stats))


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; from pinned host memory, asynchronously in stream order, on CUDA."""
    if dst.device.type == "cpu" or src.device.type != "cpu":
        dst.copy_(src)
    else:
        dst.copy_(src.pin_memory(), non_blocking=True)
