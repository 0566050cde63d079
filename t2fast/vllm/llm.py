"""``t2fast.vllm.LLM``: a ``vllm.LLM`` serving a model with SVF layers and per-request experts.

    from vllm import SamplingParams
    from t2fast.vllm import LLM

    llm = LLM("path/to/llama", experts=["math.safetensors", "code.safetensors"],
              targets="all", enforce_eager=True)
    outs = llm.generate(["2+2=", "def f(x):"], [
        SamplingParams(max_tokens=16, extra_args={"t2": {"expert": "math"}}),
        SamplingParams(max_tokens=16, extra_args={"t2": {"alpha": {"math": 0.3, "code": 0.7}}}),
    ])
    llm.load_experts(["reasoning.safetensors"])     # every worker, between steps
    llm.unload_experts(["code"])

It only fills in vLLM's own arguments — ``hf_overrides`` (the t2fast architecture),
``additional_config["t2fast"]`` (the settings) and ``worker_extension_cls`` — so the same
engine can be started with ``vllm serve`` and those flags.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..experts import load_expert
from ..mixtures import MixtureBounds
from .config import ARCHITECTURES, CONFIG_KEY, T2_ARCHITECTURES, T2Config

WORKER_EXTENSION = "t2fast.vllm.worker.T2WorkerExtension"


def _hf_architecture(model: str, hf_overrides) -> str:
    if isinstance(hf_overrides, dict) and hf_overrides.get("architectures"):
        return hf_overrides["architectures"][0]
    cfg_path = Path(model) / "config.json"
    if cfg_path.exists():
        archs = json.loads(cfg_path.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig

        archs = getattr(AutoConfig.from_pretrained(model), "architectures", None) or []
    if not archs:
        raise ValueError(f"t2fast: cannot tell the architecture of {model!r} (no "
                         f"'architectures' in its config)")
    return archs[0]


def engine_args(model: str, experts=(), targets=None, layers=None, *,
                config: T2Config | None = None, mixture_bounds: MixtureBounds | None = None,
                **kwargs) -> dict:
    """The ``vllm.LLM`` / ``EngineArgs`` keyword arguments that serve ``model`` with t2fast.

    ``config`` is a :class:`T2Config` (default ``T2Config()``); ``experts``, ``targets``,
    ``layers``, ``mixture_bounds`` and every keyword argument named like a :class:`T2Config`
    field (``backend``, ``max_experts``, ``hybrid``, ``deterministic``, ``cache_dir``,
    ``allow_other_model``, ``max_alpha_abs`` ...) replace its settings; the other keyword
    arguments go to vLLM.
    ``experts`` must be file paths here (they travel in ``additional_config``), each read and
    checked now (:func:`t2fast.experts.load_expert`; against the model in the workers); the bank
    holds at least all of them, whatever ``max_experts`` says.
    """
    t2_fields = {f.name for f in dataclasses.fields(T2Config)}
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in t2_fields}
    vllm_kwargs = kwargs
    base = T2Config.build(config)
    if experts:
        settings["experts"] = [str(p) for p in experts]
    for path in settings.get("experts", base.experts):  # what a worker would fail on, said now
        load_expert(path)
    given = settings.get("max_experts")
    if given is not None:
        T2Config.build(base, max_experts=given)         # a bad value is named as given
    settings["max_experts"] = max(base.max_experts if given is None else given,
                                  len(settings.get("experts", base.experts)))
    cfg = T2Config.build(base, mixture_bounds, targets=targets, layers=layers, **settings)
    hf_overrides = dict(vllm_kwargs.pop("hf_overrides", None) or {})
    arch = _hf_architecture(model, hf_overrides)
    if arch not in T2_ARCHITECTURES:
        if arch not in ARCHITECTURES:
            raise ValueError(f"t2fast: architecture {arch!r} is not supported; supported: "
                             f"{sorted(ARCHITECTURES)}")
        arch = ARCHITECTURES[arch]
    hf_overrides["architectures"] = [arch]
    additional = dict(vllm_kwargs.pop("additional_config", None) or {})
    additional[CONFIG_KEY] = cfg.to_dict()
    ext = vllm_kwargs.pop("worker_extension_cls", None) or WORKER_EXTENSION
    if ext != WORKER_EXTENSION:
        from vllm.utils.import_utils import resolve_obj_by_qualname

        from .worker import T2WorkerExtension
        if not issubclass(resolve_obj_by_qualname(ext), T2WorkerExtension):
            raise ValueError(f"t2fast: worker_extension_cls must subclass {WORKER_EXTENSION}")
    return dict(model=model, hf_overrides=hf_overrides, additional_config=additional,
                worker_extension_cls=ext, **vllm_kwargs)


class LLM:
    """A ``vllm.LLM`` whose model uses SVF layers; each request may name expert(s) or α.

    Args:
        model: a Llama / Mistral / Qwen2 checkpoint (folder or hub name).
        experts: expert files (bank order) or :class:`t2fast.experts.Expert` objects.
        targets, layers: matrices to adapt, as in :func:`t2fast.patch_model`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the SVF kernels.
        max_experts: bank capacity (default 8, at least ``len(experts)``).
        hybrid: in eager mode, dense weights for single-mixture steps (off by default:
            a request's greedy answer may then depend on its batch).
        deterministic: batch-invariant SVF kernel plans (default True); False opts in to
            the order-dependent ones (:class:`t2fast.config.SVFConfig`).
        cache_dir: SVD cache folder; ``False`` disables it.
        mixture_bounds: :class:`t2fast.mixtures.MixtureBounds` for every request's α.
        config: a :class:`T2Config` whose settings the arguments above replace
            (:func:`engine_args`).
        **vllm_kwargs: anything ``vllm.LLM`` takes (``enforce_eager``, ``max_model_len`` ...).
            On vLLM's CPU build, ``kv_cache_memory_bytes`` defaults to a share of the memory
            available (as for ``t2fast serve``; :mod:`t2fast.vllm.environment`).
    Attributes:
        llm: the underlying ``vllm.LLM``; ``generate``/``chat``/... are forwarded to it.
    """

    def __init__(self, model: str, experts=(), targets=None, layers=None, **kwargs):
        from .environment import KV_OPTIONS, cpu_kv_cache_bytes, import_vllm, startup_errors

        import_vllm()
        from vllm import LLM as VLLM

        from ..experts import Expert

        kv_size = cpu_kv_cache_bytes(any(o[2:].replace("-", "_") in kwargs for o in KV_OPTIONS))
        if kv_size is not None:
            kwargs["kv_cache_memory_bytes"] = kv_size

        experts = list(experts)
        files = [e for e in experts if not isinstance(e, Expert)]
        objects = [e for e in experts if isinstance(e, Expert)]
        given = kwargs.get("max_experts")
        cfg = T2Config.build(kwargs.get("config"), **({} if given is None else
                                                      {"max_experts": given}))  # checks it
        # the bank holds the files (these, else the config's) and the objects loaded after
        kwargs["max_experts"] = max(cfg.max_experts, len(files or cfg.experts) + len(objects))
        args = engine_args(str(model), files, targets, layers, **kwargs)
        with startup_errors():
            self.llm = VLLM(**args)
        self._frontend = self._find_frontend()
        if objects:
            self.load_experts(objects)

    def _find_frontend(self):
        from .frontend import frontend_of

        fe = frontend_of(self.llm.llm_engine.input_processor)
        if fe is None:
            raise RuntimeError("t2fast: the engine's front end is not t2fast's; is the t2fast "
                               "vLLM plugin disabled (VLLM_PLUGINS)?")
        return fe

    def __getattr__(self, name):
        if name == "llm":
            raise AttributeError(name)
        return getattr(self.llm, name)

    # ---- experts ------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return list(self._frontend.names)

    def load_experts(self, experts, allow_other_model: bool | None = None,
                     replace: bool = False) -> list[str]:
        """Load experts (files or :class:`Expert` objects) into every worker. A name already
        loaded is an error unless ``replace=True`` (the new expert then takes its bank row).
        Returns the bank order."""
        from ..experts import Expert, load_expert
        from ..mixtures import check_z
        from .frontend import expert_digest, file_digest
        from .worker import encode_expert

        payload, entries = [], []
        for e in experts:
            if isinstance(e, Expert):
                for target, z in e.z.items():    # finite, in range: refuse here, not in workers
                    check_z(target, z, where=f"expert {e.name!r}")
                payload.append(encode_expert(e))
                entries.append((e.name, expert_digest(e)))
            else:
                # readable, valid name, finite and bounded z: fail here, not in the workers
                name = load_expert(e).name
                payload.append(str(e))
                entries.append((name, file_digest(e)))
        self._frontend.check_load([n for n, _ in entries], replace)
        results = self._rpc("t2_load_experts", payload, allow_other_model)
        for name, digest in entries:
            self._frontend.add(name, digest)
        self._check_order(results)
        return list(self._frontend.names)

    def unload_experts(self, names) -> list[str]:
        """Remove experts from every worker's bank (and from what requests may name)."""
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self._frontend.names]
        if unknown:
            raise ValueError(f"t2fast: cannot unload {unknown}: not loaded (loaded: "
                             f"{self._frontend.names or '(none)'})")
        for n in names:  # new requests are refused from now on
            self._frontend.remove(n)
        results = self._rpc("t2_unload_experts", list(names))
        self._check_order(results)
        return list(self._frontend.names)

    def _rpc(self, method: str, *args) -> list:
        from .worker import worker_error
        results = self.llm.collective_rpc(method, args=args)
        error = worker_error(results)
        if error is not None:
            raise ValueError(f"t2fast: {method} failed in a worker: {error}")
        return results

    def _check_order(self, results) -> None:
        from .worker import check_bank_order
        check_bank_order(results, self._frontend.names)

    def t2_info(self) -> list[dict]:
        """Per worker: experts, targets, settings and step statistics."""
        return self._rpc("t2_info")
