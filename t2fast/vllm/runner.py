"""Per-step metadata for the SVF layers, the expert bank of one worker, and the runner hooks.

The model's ``forward`` carries no request ids, so the mapping token → request → mixture is made
in the model runner, once per step, right after it has fixed the batch order:

* V1 runner (``vllm/v1/worker/gpu_model_runner.py``; the CPU build's ``CPUModelRunner``):
  after ``_prepare_inputs(scheduler_output, num_scheduled_tokens)`` the requests of the step are
  ``input_batch.req_ids[:num_reqs]`` with ``num_scheduled_tokens[i]`` tokens each, contiguous in
  that order; their ``SamplingParams`` are ``runner.requests[req_id].sampling_params``.
* V2 runner (``vllm/v1/worker/gpu/model_runner.py``, the default on CUDA builds): the
  ``InputBatch`` returned by ``prepare_inputs`` has ``req_ids`` and ``num_scheduled_tokens``;
  ``SamplingParams`` are only seen in ``add_requests`` (``scheduled_new_reqs``), so the hook
  records each request's spec there and forgets it in ``finish_requests``.

:class:`T2Runtime` turns that into two persistent device buffers, written with ``copy_``:
``token_slot`` [max_num_batched_tokens] int32 (padding tokens map to slot 0, the base model) and
``alpha`` [num_layers, max_num_seqs + 1, max_experts + 1] float32 (slot 0 is the base; each
distinct mixture of the step gets a slot). The SVF layers read both, so compiled graphs and
CUDA graphs see new values every step without recompiling or re-capturing.

The hooks are installed (once per process) when a t2fast model is built, and do nothing for
runners whose model is not t2fast's.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..experts import Expert, Fingerprint, load_expert
from ..mixtures import BASE, place_normal_form
from .config import T2Config, num_decoder_layers
from .layers import factors_stub
from .requests import T2RequestError, extract_spec, mixture_key, normalize_spec

logger = logging.getLogger("t2fast.vllm")

RUNTIME_ATTR = "t2_runtime"
_MISSING = object()


class T2Runtime:
    """The SVF state of one model instance in one worker: buffers, expert bank, step mode.

    Attributes:
        mode: how the last step runs in eager mode: ``"base"`` (every token on the base model:
            the original dense layers), ``"single"`` (one non-base mixture: merged weights) or
            ``"mixed"`` (the factored SVF kernels). Compiled graphs always run factored.
        stats: counters (steps per mode, merges, SVD cache hits/misses, requests rejected in the
            worker).
    """

    def __init__(self, vllm_config, config: T2Config, device=None):
        sched = vllm_config.scheduler_config
        self.config = config
        # Per-step Python dispatch (hybrid) only where no graph freezes it: eager execution.
        self.hybrid = bool(config.hybrid) and runs_eagerly(vllm_config)
        self.num_layers = num_decoder_layers(vllm_config.model_config)
        self.max_experts = config.max_experts
        self.max_slots = int(sched.max_num_seqs) + 1
        self.max_tokens = int(sched.max_num_batched_tokens)
        if device is None:
            device = getattr(vllm_config.device_config, "device", None) or "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.token_slot = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)
        self.alpha = torch.zeros(self.num_layers, self.max_slots, self.max_experts + 1,
                                 dtype=torch.float32, device=device)
        self.alpha[:, :, 0] = 1.0
        self.methods: dict = {}                # vLLM layer prefix -> SVFLinearMethod
        self.targets: dict = {}                # HF name -> (layer module, part index)
        self.factors: dict = {}                # HF name -> SVDFactors stub (shape, σ)
        self.expected_targets: list[str] = []
        self.names: list[str] = []             # loaded experts, bank order
        self.row_of: dict[str, int] = {}       # expert name -> bank row (1..max_experts)
        self.experts_meta: dict[str, dict] = {}
        self.generation = 0
        self.mode = "base"
        self.single_key = None
        self.single_slot = 0
        self._prev_tokens = 0
        self._finalized = False
        self._table = None
        self._req: dict = {}
        self._warned: set = set()
        self.stats = dict(steps_base=0, steps_single=0, steps_mixed=0, merges=0, svd_hits=0,
                          svd_misses=0, svd_from_rank0=0, rejected_in_worker=0)

    # ---- construction -------------------------------------------------------------------
    def note_decomposition(self, name: str, factors, from_cache) -> None:
        """``from_cache``: True/False, or None when the factors came from tensor-parallel
        rank 0."""
        self.factors[name] = factors_stub(factors.shape, factors.S)
        key = "svd_from_rank0" if from_cache is None else (
            "svd_hits" if from_cache else "svd_misses")
        self.stats[key] += 1

    def register_target(self, name: str, method, layer, part) -> None:
        self.targets[name] = (layer, part.index)
        if not self._finalized and self.expected_targets and \
                len(self.targets) == len(self.expected_targets):
            self._finalized = True
            self._finalize()

    def _finalize(self) -> None:
        """All SVF layers are decomposed: order the targets, load the configured experts."""
        self.factors = {n: self.factors[n] for n in self.expected_targets}
        self.fingerprint = Fingerprint.of(self.factors)
        if self.config.experts:
            self.load_experts(list(self.config.experts))
        logger.info("t2fast: %d matrices adapted (%d SVDs from cache), experts %s",
                    len(self.targets), self.stats["svd_hits"], self.names or "(none)")

    def bank_z(self, name: str) -> torch.Tensor:
        layer, i = self.targets[name]
        return getattr(layer, f"t2_bank{i}")

    # ---- expert bank --------------------------------------------------------------------
    def load_experts(self, experts, allow_other_model: bool | None = None) -> list[str]:
        """Load experts (file paths or :class:`Expert` objects) into the bank; a loaded name is
        replaced. All are checked before any is written. Returns the bank's names in order."""
        allow = self.config.allow_other_model if allow_other_model is None else allow_other_model
        loaded = [self._as_expert(e, allow) for e in experts]
        names = [e.name for e in loaded]
        if len(set(names)) != len(names) or BASE in names:
            raise ValueError(f"t2fast: expert names must be unique and not {BASE!r}: {names}")
        new = [n for n in names if n not in self.row_of]
        if len(self.names) + len(new) > self.max_experts:
            raise ValueError(f"t2fast: the expert bank holds {self.max_experts} experts; "
                             f"{len(self.names)} are loaded and {len(new)} more were given. "
                             f"Unload some, or start the engine with a larger max_experts")
        for e in loaded:
            row = self.row_of.get(e.name)
            if row is None:
                used = set(self.row_of.values())
                row = next(r for r in range(1, self.max_experts + 1) if r not in used)
                self.row_of[e.name] = row
                self.names.append(e.name)
            for t in self.factors:
                self.bank_z(t)[row].copy_(e.z[t].to(dtype=torch.float32))
            self.experts_meta[e.name] = {"base_model": e.base_model}
        self._bank_changed()
        return list(self.names)

    def unload_experts(self, names) -> list[str]:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.row_of]
        if unknown:
            raise ValueError(f"t2fast: cannot unload {unknown}: not loaded (loaded: "
                             f"{self.names or '(none)'})")
        for n in names:
            row = self.row_of.pop(n)
            self.names.remove(n)
            self.experts_meta.pop(n, None)
            for t in self.factors:
                self.bank_z(t)[row].zero_()
        self._bank_changed()
        return list(self.names)

    def _as_expert(self, e, allow: bool) -> Expert:
        if isinstance(e, Expert):
            e.check_against(self.factors, self.fingerprint, allow_other_model=allow)
            return e
        return load_expert(e, self.factors, allow_other_model=allow)

    def _bank_changed(self) -> None:
        self.generation += 1
        self._req.clear()
        self._table = None
        for m in self.methods.values():
            m.drop_merged()

    def info(self) -> dict:
        return {"experts": list(self.names), "targets": list(self.factors),
                "max_experts": self.max_experts, "num_layers": self.num_layers,
                "backend": self.config.backend, "deterministic": self.config.deterministic,
                "hybrid": self.hybrid,
                "kernels": sorted({m.kernels for m in self.methods.values() if m.kernels}),
                "stats": dict(self.stats)}

    # ---- per step -----------------------------------------------------------------------
    def alpha_of(self, normal) -> torch.Tensor:
        """α [num_layers, max_experts + 1] (column 0 = base, column r = bank row r) of a
        request's normal form (:func:`t2fast.mixtures.place_normal_form`)."""
        alpha, missing = place_normal_form(None if normal is None else normal["alpha"],
                                           self.row_of, self.num_layers, self.max_experts + 1)
        for name in missing:  # unloaded between the front end's check and this step
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("t2fast: a request uses expert %r, which is no longer loaded; "
                               "it contributes nothing", name)
        return alpha

    def _request_mixture(self, req_id, raw_of):
        hit = self._req.get(req_id)
        if hit is not None:
            return hit
        present, raw = raw_of(req_id)
        normal = None
        if present:
            try:
                normal = normalize_spec(raw, self.names, self.num_layers,
                                        self.config.mixture_bounds)
            except T2RequestError as exc:
                # The front end validates requests; one that skipped it must not kill the worker.
                self.stats["rejected_in_worker"] += 1
                logger.error("t2fast: request %s: %s; serving it with the base model", req_id,
                             exc)
        key = mixture_key(normal)
        hit = (key, None if key is None else self.alpha_of(normal))
        self._req[req_id] = hit
        return hit

    def prepare_step(self, req_ids, raw_of, num_scheduled_tokens) -> None:
        """Write the token → slot map and the slots' α for one step.

        Args:
            req_ids: the step's requests in batch order.
            raw_of: ``req_id -> (present, extra_args["t2"])``.
            num_scheduled_tokens: tokens of each request in this step (same order).
        """
        n = len(req_ids)
        if len(self._req) > 4 * self.max_slots + 64:
            live = set(req_ids)
            self._req = {k: v for k, v in self._req.items() if k in live}
        slots = np.zeros(n, dtype=np.int32)
        slot_of_key = {None: 0}
        keys, alphas = [], []
        for i, rid in enumerate(req_ids):
            key, a = self._request_mixture(rid, raw_of)
            s = slot_of_key.get(key)
            if s is None:
                s = slot_of_key[key] = len(keys) + 1
                keys.append(key)
                alphas.append(a)
            slots[i] = s
        tok = np.repeat(slots, np.asarray(num_scheduled_tokens, dtype=np.int64))
        T = int(tok.shape[0])
        if T > self.max_tokens:
            raise RuntimeError(f"t2fast: step has {T} tokens, more than max_num_batched_tokens "
                               f"= {self.max_tokens}")
        _copy_np(self.token_slot[:T], tok)
        if self._prev_tokens > T:
            self.token_slot[T:self._prev_tokens].zero_()
        self._prev_tokens = T
        table = (self.generation, tuple(keys))
        if keys and table != self._table:
            _copy_tensor(self.alpha[:, 1:1 + len(keys)], torch.stack(alphas, dim=1))
        self._table = table
        if not keys:
            self.mode = "base"
            self.stats["steps_base"] += 1
        elif len(keys) == 1 and bool((slots == 1).all()):
            self.mode = "single"
            self.single_key = (self.generation, keys[0])
            self.single_slot = 1
            self.stats["steps_single"] += 1
        else:
            self.mode = "mixed"
            self.stats["steps_mixed"] += 1


def runs_eagerly(vllm_config) -> bool:
    """True when the model's forward runs as plain Python each step (no torch.compile graph,
    no CUDA graph), so a layer may branch on per-step state."""
    if getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False):
        return True
    cc = getattr(vllm_config, "compilation_config", None)
    if cc is None:
        return False
    try:
        from vllm.config import CompilationMode, CUDAGraphMode
    except Exception:  # noqa: BLE001
        return False
    return cc.mode == CompilationMode.NONE and cc.cudagraph_mode in (None, CUDAGraphMode.NONE)


def _copy_np(dst: torch.Tensor, arr: np.ndarray) -> None:
    _copy_tensor(dst, torch.from_numpy(np.ascontiguousarray(arr)))


def _copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.device.type == "cpu":
        dst.copy_(src)
    else:
        # Pinned source: the caching host allocator keeps the block until the copy is done,
        # so the copy stays asynchronous and in stream order with the model's kernels.
        dst.copy_(src.pin_memory(), non_blocking=True)


# --------------------------------------------------------------------------------------------
# Runner hooks
# --------------------------------------------------------------------------------------------
def raw_spec(params) -> tuple[bool, object]:
    return extract_spec(getattr(params, "extra_args", None) if params is not None else None)


def runtime_of(runner) -> T2Runtime | None:
    rt = runner.__dict__.get("_t2fast_runtime", _MISSING)
    if rt is _MISSING:
        try:
            model = runner.get_model()
        except Exception:  # noqa: BLE001 - no model yet: decide later
            return None
        rt = getattr(model, RUNTIME_ATTR, None)
        runner.__dict__["_t2fast_runtime"] = rt
    return rt


def install_v1_hook() -> bool:
    """Wrap the V1 runner's ``_prepare_inputs`` (once per process)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as exc:  # noqa: BLE001
        logger.debug("t2fast: V1 runner not importable (%s)", exc)
        return False
    orig = GPUModelRunner._prepare_inputs
    if getattr(orig, "_t2fast_hook", False):
        return True

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        rt = runtime_of(self)
        if rt is not None:
            n = len(num_scheduled_tokens)
            requests = self.requests
            rt.prepare_step(self.input_batch.req_ids[:n],
                            lambda rid: raw_spec(requests[rid].sampling_params),
                            num_scheduled_tokens)
        return out

    _prepare_inputs._t2fast_hook = True
    _prepare_inputs.__wrapped__ = orig
    GPUModelRunner._prepare_inputs = _prepare_inputs
    return True


# V2 runner: the steps of each hook, kept free of the runner so they can be tested on the CPU.
def v2_record_new_requests(specs: dict, scheduler_output) -> None:
    """Remember each new request's spec (V2 keeps no SamplingParams per request)."""
    for new in scheduler_output.scheduled_new_reqs:
        specs[new.req_id] = raw_spec(new.sampling_params)


def v2_forget_finished(specs: dict, scheduler_output) -> None:
    """Drop finished requests (preempted ones come back without new SamplingParams: keep)."""
    for rid in scheduler_output.finished_req_ids:
        specs.pop(rid, None)


def v2_prepare_step(rt: T2Runtime, batch, specs: dict) -> None:
    """Write the step's metadata from the V2 ``InputBatch`` (requests in batch order)."""
    n = batch.num_reqs
    counts = np.asarray(batch.num_scheduled_tokens[:n])
    if int(counts.sum()) != int(batch.num_tokens):
        raise RuntimeError("t2fast: per-request mixtures need the per-request token counts on "
                           "the host; disable adaptive draft verification")
    rt.prepare_step(batch.req_ids[:n], lambda rid: specs.get(rid, (False, None)), counts)


def install_v2_hook() -> bool:
    """Wrap the V2 runner's ``add_requests``, ``finish_requests`` and ``prepare_inputs``.

    Written against vLLM 0.32's ``vllm/v1/worker/gpu/model_runner.py``. The CPU build cannot run
    the V2 runner ("Model Runner V2 requires Triton"), so only the steps above are tested here;
    the wrapping itself runs on CUDA builds.
    """
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    except Exception as exc:  # noqa: BLE001 - e.g. a build without the V2 runner
        logger.debug("t2fast: V2 runner not importable (%s)", exc)
        return False
    if getattr(V2.prepare_inputs, "_t2fast_hook", False):
        return True
    orig_add, orig_finish, orig_prepare = V2.add_requests, V2.finish_requests, V2.prepare_inputs

    def specs(self) -> dict:
        d = self.__dict__.get("_t2fast_specs")
        if d is None:
            d = self.__dict__["_t2fast_specs"] = {}
        return d

    def add_requests(self, scheduler_output, *args, **kwargs):
        if runtime_of(self) is not None:
            v2_record_new_requests(specs(self), scheduler_output)
        return orig_add(self, scheduler_output, *args, **kwargs)

    def finish_requests(self, scheduler_output, *args, **kwargs):
        if runtime_of(self) is not None:
            v2_forget_finished(specs(self), scheduler_output)
        return orig_finish(self, scheduler_output, *args, **kwargs)

    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        batch = orig_prepare(self, scheduler_output, *args, **kwargs)
        rt = runtime_of(self)
        if rt is not None:
            v2_prepare_step(rt, batch, specs(self))
        return batch

    for fn, orig in ((add_requests, orig_add), (finish_requests, orig_finish),
                     (prepare_inputs, orig_prepare)):
        fn._t2fast_hook = True
        fn.__wrapped__ = orig
    V2.add_requests = add_requests
    V2.finish_requests = finish_requests
    V2.prepare_inputs = prepare_inputs
    return True


def install_runner_hooks() -> None:
    install_v1_hook()
    install_v2_hook()
