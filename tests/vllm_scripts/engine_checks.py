"""vLLM engine runs for tests/test_vllm_integration.py (run as a subprocess: vLLM spawns).

    python engine_checks.py main     WORLD OUT.json   # t2fast engine, eager, multiprocess
    python engine_checks.py compiled WORLD OUT.json   # vanilla eager + t2fast compiled + bf16,
                                                      # in-process
    python engine_checks.py tp       WORLD OUT.json   # t2fast, eager, tensor_parallel_size=2
    python engine_checks.py triton   WORLD OUT.json [compiled]
        # the Triton kernels under TRITON_INTERPRET=1 (manual check, minutes to tens of
        # minutes on a CPU; not run by the test suite): compare with the main run's batch

WORLD is a folder made by ``tiny_world.make_world`` (model/, experts/, svd/). Each mode starts as
few engines as possible and runs many checks on each; results (token ids, errors, stats) are
written as JSON for the test to compare with vanilla vLLM and the Hugging Face reference.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("TRITON_INTERPRET", None)  # the engine uses the torch backend; keep vLLM's view

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plan  # noqa: E402

MAX_TOKENS = plan.MAX_TOKENS


def engine_kwargs(**kw):
    base = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20,
                max_num_seqs=8, seed=0, gpu_memory_utilization=0.1)
    base.update(kw)
    return base


def sp(spec=None, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                          extra_args=None if spec is None else {"t2": spec}, **kw)


def tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def t2_llm(world: Path, backend: str = "torch", hybrid: bool = True, model: str = "model",
           **kw):
    from t2fast.vllm import LLM

    return LLM(str(world / model), experts=[str(world / "experts" / f"{n}.safetensors")
                                              for n in plan.FILE_EXPERTS],
               backend=backend, hybrid=hybrid, cache_dir=str(world / "svd"),
               **engine_kwargs(**kw))


def run_batch(llm, requests):
    prompts = [p for p, _ in requests]
    return tokens(llm.generate(prompts, [sp(s) for _, s in requests], use_tqdm=False))


def _poison_bank(worker, name: str, value: float):
    """Runs in each worker (``collective_rpc`` with a function): overwrite the bank rows of
    expert ``name`` with ``value``, past every check of ``load_experts``."""
    rt = worker._t2_runtime()
    row = rt.bank.row_of[name]
    for target in rt.factors:
        rt.bank.bank_z(target)[row].fill_(value)
    rt._bank_changed()
    return row


def _kv_cache_finite(worker) -> bool:
    import torch

    caches = worker.model_runner.kv_caches
    return bool(caches) and all(bool(torch.isfinite(c).all()) for c in caches)


def poison_checks(llm, world: Path, reference: list) -> dict:
    """A poisoned expert (z = 1e30 everywhere, written into the bank behind the checks) served
    alone, in a batch with good requests, and before them: the others' tokens must equal
    ``reference`` (``plan.BATCH`` served before) and the KV cache must stay finite. The
    poisoned rows are kept beside the same prompts served with the expert the poison was
    copied from (``unpoisoned``), so a poison that never reached the served tables shows."""
    from t2fast.experts import Expert, load_expert

    # α lists follow the bank order, which the poisoned expert extends: keep the named forms.
    rows = [i for i, (_, spec) in enumerate(plan.BATCH)
            if not isinstance((spec or {}).get("alpha"), list)]
    good = [plan.BATCH[i] for i in rows]
    e = load_expert(world / "experts" / "math.safetensors")
    llm.load_experts([Expert("poison", e.z, e.base_model, e.fingerprint)])
    llm.collective_rpc(_poison_bank, args=("poison", 1e30))
    bad = [(p, {"expert": "poison"}) for p in plan.PROMPTS[:2]]
    out = {"alone": run_batch(llm, bad[:1])}
    served = run_batch(llm, bad + good)
    out["poisoned"], out["batch"] = served[:len(bad)], served[len(bad):]
    out["after"] = run_batch(llm, good)
    out["kv_finite"] = llm.collective_rpc(_kv_cache_finite)
    out["reference"] = [reference[i] for i in rows]
    llm.unload_experts(["poison"])
    out["unpoisoned"] = run_batch(llm, [(p, {"expert": "math"}) for p, _ in bad])
    return out


def run_main(world: Path) -> dict:
    """Eager t2fast engine in vLLM's default multiprocess layout, prefix caching on, small
    token budget (long prompts are chunked, so prefill and decode steps mix)."""
    from t2fast.experts import load_expert
    from t2fast.vllm import T2RequestError

    res: dict = {}
    t0 = time.time()
    llm = t2_llm(world, enforce_eager=True, enable_prefix_caching=True,
                 max_num_batched_tokens=64)
    res["startup_s"] = time.time() - t0
    res["info_start"] = llm.t2_info()[0]

    res["batch"] = run_batch(llm, plan.BATCH)
    res["alone"] = [run_batch(llm, [r])[0] for r in plan.BATCH]

    # Shared long prefix, served with different mixtures in turn (prefix caching on).
    pref = []
    for spec in plan.PREFIX_SPECS:
        out = llm.generate([plan.PREFIX_PROMPT], [sp(spec)], use_tqdm=False)[0]
        pref.append({"tokens": list(out.outputs[0].token_ids),
                     "cached": int(out.num_cached_tokens or 0)})
    res["prefix"] = pref

    # Bad requests: clear errors at the front end, and the engine keeps serving.
    errors = []
    for spec in plan.BAD_SPECS:
        try:
            llm.generate([plan.BATCH[0][0]], [sp(spec)], use_tqdm=False)
            errors.append({"spec": repr(spec), "error": None})
        except T2RequestError as exc:
            errors.append({"spec": repr(spec), "error": str(exc), "type": type(exc).__name__,
                           "is_value_error": isinstance(exc, ValueError)})
    res["errors"] = errors
    try:  # a bad request inside a batch with good ones
        run_batch(llm, [plan.BATCH[1], (plan.BATCH[0][0], {"expert": "nope"})])
        res["batch_error"] = None
    except T2RequestError as exc:
        res["batch_error"] = str(exc)
    res["after_errors"] = run_batch(llm, plan.BATCH[:2])

    # Expert banks at run time (collective_rpc into the worker).
    res["unload"] = llm.unload_experts(["code"])
    try:
        run_batch(llm, [(plan.BATCH[0][0], {"expert": "code"})])
        res["unloaded_error"] = None
    except T2RequestError as exc:
        res["unloaded_error"] = str(exc)
    res["reload"] = llm.load_experts([str(world / "experts" / "code.safetensors")])
    res["reloaded"] = run_batch(llm, [r for r in plan.BATCH if "code" in json.dumps(r[1])])
    objects = [load_expert(world / "experts" / f"{n}.safetensors") for n in plan.OBJECT_EXPERTS]
    res["load_objects"] = llm.load_experts(objects)
    res["objects"] = run_batch(llm, plan.OBJECT_REQUESTS)
    res["poison"] = poison_checks(llm, world, res["batch"])
    res["info_end"] = llm.t2_info()[0]
    del llm
    res["other_model_error"] = other_model_start_error(world)
    res["total_s"] = time.time() - t0
    return res


def other_model_start_error(world: Path) -> str | None:
    """Start an engine with an expert whose fingerprint names another model (its Σσ 10 %
    off): the start must fail with t2fast's reason, not only vLLM's "engine core failed"."""
    import gc

    from t2fast.experts import Fingerprint, load_expert
    from t2fast.vllm import LLM
    from t2fast.vllm.environment import T2StartupError

    gc.collect()
    expert = load_expert(world / "experts" / "math.safetensors")
    fp = expert.fingerprint
    expert.fingerprint = Fingerprint(fp.shapes, {n: 1.1 * s for n, s in fp.sigma_sums.items()})
    path = expert.save(world / "other_model" / "math.safetensors")
    try:
        LLM(str(world / "model"), experts=[str(path)], backend="torch",
            cache_dir=str(world / "svd"), enforce_eager=True, **engine_kwargs())
    except T2StartupError as exc:
        return str(exc)
    return None


def run_compiled(world: Path) -> dict:
    """In-process engines (faster start): vanilla vLLM (eager), then t2fast compiled, a subset
    of the matrices, and a bf16 checkpoint."""
    import gc

    from vllm import LLM as VLLM

    res: dict = {}
    t0 = time.time()
    llm = VLLM(str(world / "model"), enforce_eager=True, **engine_kwargs())
    base_reqs = [(p, None) for p, _ in plan.BATCH]
    res["vanilla"] = run_batch(llm, base_reqs)
    # Plain vLLM with the plugin installed ignores extra_args["t2"] (no opt-in, no checks).
    res["vanilla_ignores_t2"] = run_batch(llm, [(plan.BATCH[0][0], {"expert": "nope"})])
    res["vanilla_prefix"] = run_batch(llm, [(plan.PREFIX_PROMPT, None)])
    res["vanilla_s"] = time.time() - t0
    del llm
    gc.collect()

    t1 = time.time()
    llm = t2_llm(world, enforce_eager=False)
    res["compiled_startup_s"] = time.time() - t1
    res["compiled_batch"] = run_batch(llm, plan.BATCH)
    res["compiled_alone"] = [run_batch(llm, [r])[0] for r in plan.BATCH[1:3]]
    res["compiled_poison"] = poison_checks(llm, world, res["compiled_batch"])
    res["compiled_info"] = llm.t2_info()[0]
    del llm
    gc.collect()

    # A subset of the matrices (partly adapted fused layers), eager.
    from t2fast.vllm import LLM

    sub = world / "experts" / "subset"
    llm = LLM(str(world / "model"), experts=[str(sub / "math.safetensors"),
                                             str(sub / "code.safetensors")],
              targets=plan.SUBSET_TARGETS, layers=plan.SUBSET_LAYERS, backend="torch",
              cache_dir=str(world / "svd"), enforce_eager=True, **engine_kwargs())
    res["subset_batch"] = run_batch(llm, plan.SUBSET_BATCH)
    res["subset_alone"] = [run_batch(llm, [r])[0] for r in plan.SUBSET_BATCH]
    res["subset_info"] = llm.t2_info()[0]

    # A checkpoint stored in bfloat16 and served in bfloat16, as real checkpoints are: the SVDs
    # run while vLLM's default dtype is bf16. Factored steps only (the serving default), then
    # hybrid (single-mixture steps through a merged bf16 W', which rounds differently).
    for key, hybrid in (("bf16", False), ("bf16_hybrid", True)):
        del llm
        gc.collect()
        t2 = time.time()
        llm = t2_llm(world, model="model_bf16", hybrid=hybrid, enforce_eager=True,
                     dtype="bfloat16")
        res[key] = {"startup_s": time.time() - t2,
                    "dtype": str(llm.llm_engine.model_config.dtype),
                    "batch": run_batch(llm, plan.BATCH),
                    "alone": [run_batch(llm, [r])[0] for r in plan.BATCH],
                    "info": llm.t2_info()[0]}
    res["total_s"] = time.time() - t0
    return res


def run_tp(world: Path) -> dict:
    """Tensor parallel over two CPU ranks (one core each)."""
    res: dict = {}
    t0 = time.time()
    llm = t2_llm(world, enforce_eager=True, tensor_parallel_size=2)
    res["startup_s"] = time.time() - t0
    res["batch"] = run_batch(llm, plan.BATCH)
    # Banks change on every rank (collective_rpc reaches both workers).
    code_rows = [r for r in plan.BATCH if "code" in json.dumps(r[1])]
    res["unload"] = llm.unload_experts(["code"])
    res["load"] = llm.load_experts([str(world / "experts" / "code.safetensors")])
    res["reloaded"] = run_batch(llm, code_rows)
    res["info"] = llm.t2_info()
    res["total_s"] = time.time() - t0
    return res


def run_triton(world: Path, compiled: bool) -> dict:
    """backend="triton" through the custom op, run by Triton's CPU interpreter."""
    res: dict = {}
    t0 = time.time()
    llm = t2_llm(world, enforce_eager=not compiled, hybrid=False, backend="triton",
                 max_num_batched_tokens=256)
    res["startup_s"] = time.time() - t0
    res["batch"] = run_batch(llm, plan.BATCH[:4])
    res["info"] = llm.t2_info()[0]
    res["total_s"] = time.time() - t0
    return res


def bind_two_cpus() -> None:
    """vLLM's CPU backend binds one OpenMP core per rank (and reserves one by default)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


if __name__ == "__main__":
    mode, world, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "compiled":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        result = run_compiled(world)
    elif mode == "main":
        # poison_checks sends a function to the worker process (pickled: test-only).
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        result = run_main(world)
    elif mode == "tp":
        bind_two_cpus()
        result = run_tp(world)
    elif mode == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        result = run_triton(world, compiled=sys.argv[4:5] == ["compiled"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
