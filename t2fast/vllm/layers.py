"""SVF inside vLLM's linear layers.

vLLM's ``QKVParallelLinear`` (q, k, v), ``MergedColumnParallelLinear`` (gate, up) and
``RowParallelLinear`` (o, down) do their math in ``layer.quant_method.apply(layer, x, bias)``.
:func:`install_svf_methods` swaps that method, at model construction, for
:class:`SVFLinearMethod`, which wraps the original one:

* ``process_weights_after_loading``: before the original method repacks (and, on the CPU,
  drops) ``layer.weight``, split the fused weight by ``layer.output_partition_sizes`` into the
  Hugging Face matrices (q_proj, k_proj, v_proj / gate_proj, up_proj), take one thin SVD per
  *full* HF matrix through :class:`t2fast.decompose.SVDCache` (so a restart reads it from disk
  and the factors are the ones ``patch_model`` uses), keep this rank's shard of the factors, and
  give each adapted matrix an expert bank ``[max_experts + 1, r]`` (row 0 = base, z = 1).
* The adapted parts of one layer form a group (q/k/v, gate/up; o, down alone): their factors
  are stacked once (:func:`t2fast.ops.stack_group`: U_i packed in one buffer, S, Vh and the
  expert bank stacked along the rank) and each part's ``t2_U{i}``, ``t2_S{i}``, ``t2_Vh{i}``,
  ``t2_bank{i}`` are views of those stacks, so nothing is held twice.
* ``apply``: ``y[t] = U_i (S_i ⊙ z_{slot(t)} ⊙ (Vh_i x[t]))`` for every adapted part at once
  through :func:`t2fast.ops.svf_group_mix` (z mixed from the bank by the slot's α; two kernel
  launches per layer, whose output is already vLLM's fused layout), with ``backend`` and
  ``deterministic`` as configured: ``auto`` means what it means in :mod:`t2fast.ops` (the plan's
  backend), for the Hugging Face and the vLLM layers alike. Parts that are not adapted run
  their dense rows and are concatenated in place. The token → slot map and the α table are
  persistent buffers of the runtime shared by all layers (:class:`t2fast.vllm.runner.
  T2Runtime`), updated with ``copy_`` before each step, so a compiled graph (and a CUDA graph)
  sees each step's values.
* The output of every layer that writes keys and values is passed through
  :func:`t2fast.vllm.kv_guard.finite_guard`, so the KV cache never holds a non-finite number.
* Hybrid (eager execution only: no torch.compile graph, no CUDA graph): a step in which every
  token uses the base model runs the original method (bit-identical to vanilla vLLM); a step
  with a single non-base mixture runs a dense merged ``W'`` from the runtime's merge cache
  (:class:`t2fast.runtime.MergeCache`, within ``merge_cache_bytes``).

Tensor parallelism: the SVD of a shard is not a shard of the SVD, so each rank all-gathers the
full HF matrix, rank 0 decomposes it (or reads the disk cache) and broadcasts the factors, and
each rank keeps the rows of ``U`` matching its output shard (column-parallel: q/k/v, gate/up)
or the columns of ``Vh`` matching its input shard (row-parallel: o, down); σ, z and the banks
are replicated. With ``tp > num_kv_heads`` (replicated kv heads) the duplicate k/v shards are
dropped from the gather.
Then the row-parallel all-reduce that vLLM already does sums ``U S z Vh_r x_r`` over ranks into
``U S z Vh x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..decompose import SVDCache, SVDFactors, decompose_weight
from ..layers import capturing
from ..targets import ATTENTION, FUSED, MLP, PRESETS, layer_index, resolve_targets
from .environment import reports_startup_errors
from .kv_guard import KVGuardMethod, WrappedMethod, finite_guard, writes_kv

#: vLLM's packed modules (its ``packed_modules_mapping`` when the model gives none).
FUSED_DEFAULT = {fused: list(parts) for fused, parts in FUSED.items()}
ROW_PARALLEL = ("o_proj", "down_proj")
COLUMN_PARALLEL = tuple(n for n in ATTENTION + MLP if n not in ROW_PARALLEL)


# --------------------------------------------------------------------------------------------
# Names and targets
# --------------------------------------------------------------------------------------------
def hf_part_names(prefix: str, packed: dict) -> list[str]:
    """HF module names held by the vLLM linear layer named ``prefix``
    (``model.layers.0.self_attn.qkv_proj`` → ``[... .q_proj, ... .k_proj, ... .v_proj]``)."""
    parent, _, short = prefix.rpartition(".")
    parts = packed.get(short, [short])
    return [f"{parent}.{p}" if parent else p for p in parts]


def select_targets(names: list[str], targets="all", layers=None) -> list[str]:
    """The subset of HF module ``names`` that ``targets``/``layers`` select, with exactly the
    semantics of :func:`t2fast.targets.resolve_targets` (run over a shape-less stand-in model
    of the split names, so a fused projection's name, ``qkv_proj`` or ``...gate_up_proj``,
    stands for its parts as it does on a Hugging Face model that holds it)."""
    if not (isinstance(targets, str) and targets in PRESETS):
        targets = [f"{parent}{'.' if parent else ''}{part}"
                   for t in ([targets] if isinstance(targets, str) else targets)
                   for parent, _, short in [t.rpartition(".")]
                   for part in FUSED.get(short, (short,))]
    root = nn.Module()
    for name in names:
        node = root
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, nn.Linear(1, 1, bias=False, device="meta"))
    return resolve_targets(root, targets, layers)


# --------------------------------------------------------------------------------------------
# The quant-method wrapper
# --------------------------------------------------------------------------------------------
class SVFPart:
    """One HF matrix inside a vLLM linear layer."""

    def __init__(self, name: str, index: int, target: bool):
        self.name = name
        self.index = index
        self.target = target
        self.out_size = 0      # rows of this rank's shard of the part
        self.rank = 0          # r = min(m, n) of the full HF matrix


class SVFLinearMethod(WrappedMethod):
    """Wraps a linear layer's original (unquantized) method; see the module docstring."""

    def __init__(self, base, runtime, prefix: str, parts: list[SVFPart], layer_idx: int,
                 row_parallel: bool):
        super().__init__(base)
        self.runtime = runtime
        self.prefix = prefix
        self.parts = parts
        self.layer_idx = layer_idx
        self.row_parallel = row_parallel
        self.guard_kv = writes_kv(p.name for p in parts)
        self.backend = runtime.config.backend     # passed to t2fast.ops as configured
        self.deterministic = runtime.config.deterministic
        self.kernels = None                         # what runs on the layer's device (loaded)

    # ---- loading ------------------------------------------------------------------------
    def _full_matrices(self, layer, w: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(full HF matrix, offset of this rank's shard in it) per part."""
        tp = int(getattr(layer, "tp_size", 1) or 1)
        rank = int(getattr(layer, "tp_rank", 0) or 0)
        sizes = list(getattr(layer, "output_partition_sizes", [w.shape[0]]))
        if len(sizes) != len(self.parts):
            raise RuntimeError(f"t2fast: {self.prefix} has output partitions {sizes}, expected "
                               f"{len(self.parts)} ({[p.name for p in self.parts]})")
        locals_, off = [], 0
        for p, size in zip(self.parts, sizes):
            p.out_size = size
            locals_.append(w[off:off + size])
            off += size
        if tp == 1:
            return [(m, 0) for m in locals_]
        from vllm.distributed import tensor_model_parallel_all_gather as all_gather

        if self.row_parallel:
            return [(all_gather(m.contiguous(), dim=1), rank * m.shape[1]) for m in locals_]
        out = []
        replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
        for p, m in zip(self.parts, locals_):
            full = all_gather(m.contiguous(), dim=0)
            shard = m.shape[0]
            is_kv = replicas > 1 and p.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj")
            if is_kv:
                # tp > num_kv_heads: rank r holds kv shard r // replicas; drop the duplicates.
                full = torch.cat([full[i * shard:(i + 1) * shard]
                                  for i in range(0, tp, replicas)], dim=0)
                out.append((full, (rank // replicas) * shard))
            else:
                out.append((full, rank * shard))
        return out

    @reports_startup_errors
    def process_weights_after_loading(self, layer) -> None:
        rt = self.runtime
        w = layer.weight.detach()
        self.kernels = ops.resolve_backend(rt.config.backend, w.device)  # clear error if unusable
        cache = None if rt.config.cache_dir is False else SVDCache(rt.config.svd_cache_dir())
        factors = {}
        for p, (full, offset) in zip(self.parts, self._full_matrices(layer, w)):
            if not p.target:
                layer.register_buffer(f"t2_W{p.index}", _local_rows(w, self.parts, p).clone(),
                                      persistent=False)
                continue
            f, hit = self._decompose(layer, full, cache)
            rt.note_decomposition(p.name, f, hit)
            p.rank = f.rank
            U, Vh = f.U, f.Vh
            if self.row_parallel and full.shape[1] != w.shape[1]:
                Vh = Vh[:, offset:offset + w.shape[1]]
            elif not self.row_parallel and full.shape[0] != p.out_size:
                U = U[offset:offset + p.out_size]
            factors[p.index] = (U.to(w.device, w.dtype), f.S.to(w.device, torch.float32),
                                Vh.to(w.device, w.dtype))
        rt.merged_bytes += w.numel() * w.element_size()     # this layer's merged weight
        self._register_group(layer, factors)
        layer.register_buffer("t2_token_slot", rt.slot_map, persistent=False)
        layer.register_buffer("t2_alpha", rt.alpha, persistent=False)
        self.base.process_weights_after_loading(layer)

    def _register_group(self, layer, factors: dict) -> None:
        """Stack the adapted parts' factors (``t2_group_S``, ``t2_group_Vh``), add them to the
        runtime as one group (its bank table, ``t2_group_bank`` [max_experts + 1, R], row 0 =
        base) and register each part's ``t2_U{i}``, ``t2_S{i}``, ``t2_Vh{i}``, ``t2_bank{i}``
        as views of them."""
        order = sorted(factors)
        Us, S, Vh = ops.stack_group(*zip(*(factors[i] for i in order)))
        g = self.runtime.register_group([p for p in self.parts if p.target], self.layer_idx)
        bank = self.runtime.bank.tables[g]
        for name, t in (("t2_group_S", S), ("t2_group_Vh", Vh), ("t2_group_bank", bank)):
            layer.register_buffer(name, t, persistent=False)
        at = 0
        for i, U in zip(order, Us):
            r = U.shape[1]
            for name, t in (("U", U), ("S", S[at:at + r]), ("Vh", Vh[at:at + r]),
                            ("bank", bank[:, at:at + r])):
                layer.register_buffer(f"t2_{name}{i}", t, persistent=False)
            at += r

    @staticmethod
    def _decompose(layer, full: torch.Tensor, cache):
        """Factors of ``full``; with tensor parallelism rank 0 computes (or reads) them and
        broadcasts, so every rank holds the same basis and only one process writes the cache."""
        tp = int(getattr(layer, "tp_size", 1) or 1)
        rank = int(getattr(layer, "tp_rank", 0) or 0)
        if tp == 1 or rank == 0:
            if cache is None:
                f, hit = decompose_weight(full), False
            else:
                f, hit = cache.get_or_compute(full)
        if tp == 1:
            return f, hit
        from vllm.distributed import get_tp_group

        m, n = full.shape
        r = min(m, n)
        if rank != 0:
            f, hit = SVDFactors(full.new_empty(m, r, dtype=torch.float32),
                                full.new_empty(r, dtype=torch.float32),
                                full.new_empty(r, n, dtype=torch.float32)), None
        group = get_tp_group()
        U, S, Vh = (group.broadcast(t.to(full.device).contiguous(), src=0)
                    for t in (f.U, f.S, f.Vh))
        return SVDFactors(U, S, Vh), hit

    # ---- forward ------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self._apply(layer, x, bias)
        return finite_guard(y) if self.guard_kv else y

    def _apply(self, layer, x, bias):
        rt = self.runtime
        if rt.hybrid and not torch.compiler.is_compiling() and not capturing():
            mode = rt.mode
            if mode == "base":
                return self.base.apply(layer, x, bias)
            if mode == "merged":
                return F.linear(x, rt.merged(self.prefix, lambda z_of: self._merge(layer, z_of)),
                                bias)
        return self._factored(layer, x, bias)

    def _factored(self, layer, x, bias):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        targets = [p for p in self.parts if p.target]
        y = ops.svf_group_mix(x2, [getattr(layer, f"t2_U{p.index}") for p in targets],
                              layer.t2_group_S, layer.t2_group_Vh,
                              layer.t2_alpha[self.layer_idx], layer.t2_group_bank,
                              layer.t2_token_slot[:x2.shape[0]], backend=self.backend,
                              validate=False, deterministic=self.deterministic)
        if len(targets) < len(self.parts):
            outs, at = [], 0
            for p in self.parts:
                if p.target:
                    outs.append(y[:, at:at + p.out_size])
                    at += p.out_size
                else:
                    outs.append(F.linear(x2, getattr(layer, f"t2_W{p.index}")))
            y = torch.cat(outs, dim=-1)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def _merge(self, layer, z_of) -> torch.Tensor:
        """This layer's dense merged weight (all parts, fused layout) for the runtime's merged
        mixture; ``z_of(name)`` is an adapted part's mixed z [r]."""
        rows = [ops.svf_merge(getattr(layer, f"t2_U{p.index}"), getattr(layer, f"t2_S{p.index}"),
                              z_of(p.name), getattr(layer, f"t2_Vh{p.index}"),
                              backend=self.backend)
                if p.target else getattr(layer, f"t2_W{p.index}") for p in self.parts]
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _local_rows(w: torch.Tensor, parts: list[SVFPart], part: SVFPart) -> torch.Tensor:
    off = sum(p.out_size for p in parts[:part.index])
    return w[off:off + part.out_size]


# --------------------------------------------------------------------------------------------
# Installation at model construction
# --------------------------------------------------------------------------------------------
def _linear_types():
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                                   QKVParallelLinear, RowParallelLinear)
    return QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear


def install_svf_methods(model: nn.Module, runtime, packed: dict | None = None) -> list[str]:
    """Swap the quant methods of ``model``'s target projections for :class:`SVFLinearMethod`.

    Called from the t2fast model classes' ``__init__`` (before weights load). Layers that write
    the KV cache but hold no target get a :class:`t2fast.vllm.kv_guard.KVGuardMethod`. Returns
    the HF names of the adapted matrices, in model order.
    """
    qkv_t, merged_t, row_t = _linear_types()
    packed = dict(FUSED_DEFAULT if packed is None else packed)
    cfg = runtime.config
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (qkv_t, merged_t, row_t)):
            continue
        prefix = getattr(mod, "prefix", "") or name
        short = prefix.rsplit(".", 1)[-1]
        if layer_index(prefix) is None:
            continue
        if isinstance(mod, row_t) and short not in ROW_PARALLEL:
            continue
        if not isinstance(mod, row_t) and short not in packed and short not in COLUMN_PARALLEL:
            continue
        layers.append((prefix, mod))
    all_names = [n for prefix, _ in layers for n in hf_part_names(prefix, packed)]
    if not all_names:
        raise ValueError("t2fast: found no q/k/v/o/gate/up/down projections in the model")
    chosen = set(select_targets(all_names, cfg.targets, cfg.layers))
    adapted = []
    for prefix, mod in layers:
        names = hf_part_names(prefix, packed)
        if not any(n in chosen for n in names):
            if writes_kv(names):  # no target here, but its output still goes to the KV cache
                _check_unquantized(prefix, mod.quant_method)
                mod.quant_method = KVGuardMethod(mod.quant_method)
            continue
        base = mod.quant_method
        if isinstance(base, SVFLinearMethod):
            raise RuntimeError(f"t2fast: {prefix} is already an SVF layer")
        _check_unquantized(prefix, base)
        parts = [SVFPart(n, i, n in chosen) for i, n in enumerate(names)]
        mod.quant_method = SVFLinearMethod(base, runtime, prefix, parts, layer_index(prefix),
                                           isinstance(mod, row_t))
        runtime.methods[prefix] = mod.quant_method
        adapted.extend(n for n in names if n in chosen)
    return adapted


def _check_unquantized(prefix: str, method) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if not isinstance(method, UnquantizedLinearMethod):
        raise NotImplementedError(
            f"t2fast: {prefix} uses {type(method).__name__}; t2fast wraps unquantized weights "
            f"only (serve the unquantized model)")


def factors_stub(shape: tuple[int, int], S: torch.Tensor) -> SVDFactors:
    """SVD factors with the right shapes and σ but no U/Vh data (for expert checks)."""
    m, n = shape
    r = S.shape[0]
    return SVDFactors(torch.empty(m, r, device="meta"), S.detach().float().cpu(),
                      torch.empty(r, n, device="meta"))
