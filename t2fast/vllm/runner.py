"""The vLLM adapter of the SVF runtime: per-step metadata from the model runner, the worker's
expert bank, and the runner hooks.

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

:class:`T2Runtime` is a :class:`t2fast.runtime.SVFRuntime` with fixed table sizes: the slot map
holds one slot per token (``max_num_batched_tokens``; padding tokens map to slot 0, the base
model), the α table ``max_num_seqs + 1`` slots. The SVF layers register both as buffers, so
compiled graphs and CUDA graphs see new values every step without recompiling or re-capturing.

The hooks are installed (once per process) when a t2fast model is built, and do nothing for
runners whose model is not t2fast's.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..experts import Fingerprint
from ..mixtures import Mixture, extract_spec
from ..runtime import SVFRuntime, load_sources
from .config import T2Config, num_decoder_layers
from .frontend import T2RequestError, worker_mixture
from .layers import factors_stub

logger = logging.getLogger("t2fast.vllm")

RUNTIME_ATTR = "t2_runtime"
_MISSING = object()


class T2Runtime(SVFRuntime):
    """The SVF runtime of one model instance in one worker (see the module docstring).

    ``mode`` (:data:`t2fast.runtime.MODES`) is how the last step runs in eager mode; compiled
    graphs always run factored. ``stats`` counts steps per mode and merges
    (:data:`t2fast.runtime.STATS`); ``worker_stats`` the SVDs read from the cache, computed or
    received from rank 0, and requests the worker served with the base model because their
    mixture was invalid.
    """

    def __init__(self, vllm_config, config: T2Config, device=None):
        sched = vllm_config.scheduler_config
        if device is None:
            device = getattr(vllm_config.device_config, "device", None) or "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Per-step Python dispatch (hybrid) only where no graph freezes it: eager execution.
        super().__init__(num_decoder_layers(vllm_config.model_config),
                         capacity=config.max_experts, device=device,
                         bounds=config.mixture_bounds,
                         hybrid=bool(config.hybrid) and runs_eagerly(vllm_config),
                         mix_in_kernel=True, merge_cache_bytes=config.merge_cache_bytes,
                         max_slots=int(sched.max_num_seqs) + 1,
                         max_rows=int(sched.max_num_batched_tokens))
        self.config = config
        self.methods: dict = {}                # vLLM layer prefix -> SVFLinearMethod
        self.factors: dict = {}                # HF name -> SVDFactors stub (shape, σ)
        self.expected_targets: list[str] = []
        self.fingerprint: Fingerprint | None = None
        self._finalized = False
        self._req: dict = {}
        self._warned: set = set()
        self.worker_stats = dict(svd_hits=0, svd_misses=0, svd_from_rank0=0,
                                 rejected_in_worker=0)

    # ---- construction -------------------------------------------------------------------
    def note_decomposition(self, name: str, factors, from_cache) -> None:
        """``from_cache``: True/False, or None when the factors came from tensor-parallel
        rank 0."""
        self.factors[name] = factors_stub(factors.shape, factors.S)
        key = "svd_from_rank0" if from_cache is None else (
            "svd_hits" if from_cache else "svd_misses")
        self.worker_stats[key] += 1

    def register_group(self, parts, layer_idx: int) -> int:
        """Add the adapted parts (``SVFPart``) of one vLLM layer as one group of the runtime;
        once every expected target is in, load the configured experts."""
        g = self.add_group([(p.name, p.rank) for p in parts], layer_idx)
        if not self._finalized and self.expected_targets and \
                len(self.layer_of) == len(self.expected_targets):
            self._finalized = True
            self._finalize()
        return g

    def _finalize(self) -> None:
        """All SVF layers are decomposed: order the targets, load the configured experts."""
        self.factors = {n: self.factors[n] for n in self.expected_targets}
        self.fingerprint = Fingerprint.of(self.factors)
        if self.config.experts:
            self.load_experts(list(self.config.experts))
        logger.info("t2fast: %d matrices adapted (%d SVDs from cache), experts %s",
                    len(self.layer_of), self.worker_stats["svd_hits"],
                    self.expert_names or "(none)")

    # ---- expert bank --------------------------------------------------------------------
    def load_experts(self, experts, allow_other_model: bool | None = None) -> list[str]:
        """Load experts (file paths or :class:`Expert` objects) into the bank; a loaded name is
        replaced (the front end decides what may be). All are checked before any is written.
        Returns the bank's names in order."""
        allow = self.config.allow_other_model if allow_other_model is None else allow_other_model
        loaded = load_sources(list(experts), self.factors, self.fingerprint, allow)
        return super().load_experts(loaded, replace=True)

    def _bank_changed(self) -> None:
        self._req.clear()
        super()._bank_changed()

    def info(self) -> dict:
        return {**super().info(), "targets": list(self.factors),
                "backend": self.config.backend, "deterministic": self.config.deterministic,
                "kernels": sorted({m.kernels for m in self.methods.values() if m.kernels}),
                "worker_stats": dict(self.worker_stats)}

    # ---- per step -----------------------------------------------------------------------
    def place_request(self, mixture: Mixture) -> torch.Tensor | None:
        """α [num_layers, max_experts + 1] (column 0 = base, column r = bank row r) of a
        request's mixture (:meth:`t2fast.mixtures.Mixture.place`); None for the base."""
        if mixture.is_base:
            return None
        alpha, missing = mixture.place(self.bank.row_of, self.num_layers,
                                       self.bank.capacity + 1)
        for name in missing:  # unloaded between the front end's check and this step
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("t2fast: a request uses expert %r, which is no longer loaded; "
                               "it is served with the base model", name)
        # never a mixture with a weight dropped (z' = 0 for a lone expert)
        return None if missing else alpha

    def _request_mixture(self, req_id, raw_of):
        """α of a request (None: the base model), placed once per spec object: a request ID
        that comes back with other parameters (a streamed input's next chunk, an ID reused
        after its request finished) is read anew."""
        present, raw = raw_of(req_id)
        hit = self._req.get(req_id)
        if hit is not None and hit[0] is raw:
            return hit[1]
        mixture = Mixture()
        if present:
            try:
                mixture = worker_mixture(raw, self.num_layers, self.bounds)
            except T2RequestError as exc:
                # Only the front end's envelope is placed; one that skipped it must not kill
                # the worker.
                self.worker_stats["rejected_in_worker"] += 1
                logger.error("t2fast: request %s: %s; serving it with the base model", req_id,
                             exc)
        alpha = self.place_request(mixture)
        self._req[req_id] = (raw, alpha)
        return alpha

    def prepare_step(self, req_ids, raw_of, num_scheduled_tokens) -> None:
        """Write the token → slot map and the slots' α for one step.

        Args:
            req_ids: the step's requests in batch order.
            raw_of: ``req_id -> (present, extra_args["t2"])``.
            num_scheduled_tokens: tokens of each request in this step (same order).
        """
        if len(self._req) > 4 * self.alpha.shape[1] + 64:
            live = set(req_ids)
            self._req = {k: v for k, v in self._req.items() if k in live}
        alphas = [self._request_mixture(rid, raw_of) for rid in req_ids]
        self.set_row_mixtures(alphas, repeat=np.asarray(num_scheduled_tokens, dtype=np.int64),
                              fixed_rows=False)


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
