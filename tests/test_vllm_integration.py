"""t2fast.vllm on vLLM's CPU build: per-request expert mixtures inside vLLM's executor.

Engine runs are expensive on a CPU (each start-up takes tens of seconds), so two subprocesses
(tests/vllm_scripts/engine_checks.py) start three engines in all and run every check on them:

* ``main``: a t2fast engine, eager, in vLLM's real multiprocess layout (front end, engine core,
  worker), prefix caching on, a 64-token step budget (chunked prefill mixes with decode);
* ``compiled``: vanilla vLLM (eager), a t2fast engine with torch.compile, and a t2fast engine
  adapting a subset of the matrices (in-process);

and a third starts a tensor-parallel engine (two CPU ranks; the model has one kv head, so the kv
heads are replicated across ranks).

The tests below compare their token ids with each other and with the Hugging Face reference
(``t2fast.patch_model`` on the same tiny random Llama, same experts, greedy).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
    _VLLM_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM here"
    _VLLM_ERROR = f"{type(exc).__name__}: {exc}"

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(_VLLM_ERROR is not None,
                                 reason=f"vllm is not importable ({_VLLM_ERROR})")]

SCRIPTS = Path(__file__).resolve().parent / "vllm_scripts"
sys.path.insert(0, str(SCRIPTS))

import plan  # noqa: E402
import tiny_world  # noqa: E402

ENGINE_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------
# Fixtures: one tiny world, two engine subprocesses, one Hugging Face reference
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # One kv head: with two tensor-parallel ranks the kv heads are replicated.
    return tiny_world.make_world(tmp_path_factory.mktemp("t2world"),
                                 subset=(plan.SUBSET_TARGETS, plan.SUBSET_LAYERS),
                                 num_key_value_heads=1)


def _run_engines(mode: str, world: Path) -> dict:
    out = world / f"{mode}.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
    proc = subprocess.run([sys.executable, str(SCRIPTS / "engine_checks.py"), mode, str(world),
                           str(out)], env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"engine run {mode!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def main_run(world):
    return _run_engines("main", world)


@pytest.fixture(scope="module")
def compiled_run(world, main_run):  # after main_run: its SVDs are then read from disk
    return _run_engines("compiled", world)


@pytest.fixture(scope="module")
def hf(world, main_run):
    reqs = {
        "batch": plan.BATCH,
        "base": [(p, None) for p, _ in plan.BATCH],
        "prefix": [(plan.PREFIX_PROMPT, s) for s in plan.PREFIX_SPECS],
        "objects": plan.OBJECT_REQUESTS,
    }
    flat = [(p, plan.hf_spec(s)) for group in reqs.values() for p, s in group]
    toks, hits = tiny_world.hf_reference(world, flat, plan.MAX_TOKENS)
    out, i = {"cache_hits": hits}, 0
    for k, group in reqs.items():
        out[k] = toks[i:i + len(group)]
        i += len(group)
    return out


BASE_ROWS = [i for i, (_, s) in enumerate(plan.BATCH) if s is None]


# ------------------------------------------------------------------------------------------
# Engine tests
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_base_requests_match_vanilla_vllm(main_run, compiled_run, hf):
    vanilla = compiled_run["vanilla"]
    assert vanilla == hf["base"], "vanilla vLLM vs the unpatched-equivalent HF base model"
    for i in BASE_ROWS:
        assert main_run["batch"][i] == vanilla[i], f"eager t2fast base row {i}"
        assert compiled_run["compiled_batch"][i] == vanilla[i], f"compiled t2fast base row {i}"
    # z = 1 everywhere (the "ones" expert) is the base model too.
    p1_base = plan.BATCH.index((plan.PROMPTS[1], None))
    assert main_run["objects"][1] == vanilla[p1_base]
    assert main_run["prefix"][0]["tokens"] == compiled_run["vanilla_prefix"][0]


@pytest.mark.slow
def test_mixed_batch_matches_alone_and_hf_reference(main_run, hf):
    batch, alone = main_run["batch"], main_run["alone"]
    for i, (prompt, spec) in enumerate(plan.BATCH):
        assert len(batch[i]) == plan.MAX_TOKENS
        assert batch[i] == alone[i], f"request {i} ({spec}) in the batch vs alone"
        assert batch[i] == hf["batch"][i], f"request {i} ({spec}) vs HF patch_model reference"
    # The experts do change the output (same prompt, base vs math in the same batch).
    same_prompt = [i for i, (p, _) in enumerate(plan.BATCH) if p == plan.PROMPTS[1]]
    assert len({tuple(batch[i]) for i in same_prompt}) == len(same_prompt)
    stats = main_run["info_end"]["stats"]
    assert stats["factored"] > 0 and stats["merged"] > 0 and stats["base"] > 0
    assert main_run["info_end"]["hybrid"] and stats["merges"] > 0  # eager: merged fast path
    assert main_run["info_end"]["worker_stats"]["rejected_in_worker"] == 0


@pytest.mark.slow
def test_compiled_matches_eager(main_run, compiled_run):
    assert compiled_run["compiled_batch"] == main_run["batch"]
    assert compiled_run["compiled_alone"] == main_run["alone"][1:3]
    stats = compiled_run["compiled_info"]["stats"]
    assert not compiled_run["compiled_info"]["hybrid"]
    assert stats["merges"] == 0  # compiled graphs always run the factored kernels


@pytest.mark.slow
def test_target_subset_partly_adapted_fused_layers(world, compiled_run):
    info = compiled_run["subset_info"]
    assert info["targets"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                               "model.layers.1.mlp.down_proj"]
    ref, _ = tiny_world.hf_reference(
        world, [(p, plan.hf_spec(s)) for p, s in plan.SUBSET_BATCH], plan.MAX_TOKENS,
        experts=("math", "code"), targets=plan.SUBSET_TARGETS, layers=plan.SUBSET_LAYERS,
        expert_dir="experts/subset")
    assert compiled_run["subset_batch"] == compiled_run["subset_alone"] == ref
    assert compiled_run["subset_batch"][1] != compiled_run["subset_batch"][3]
    assert info["stats"]["factored"] > 0


# A bf16 engine's greedy tokens, fed back through the float32 reference, stay within this many
# logits of its argmax (logits here reach about ±11; bf16 keeps 8 significant bits, so two layers
# of rounding move them by a few tenths). Serving a wrong mixture gives gaps of 10 and more.
BF16_LOGIT_GAP = 0.5


@pytest.mark.slow
def test_bf16_checkpoint_serves_mixtures(world, compiled_run):
    run, hybrid = compiled_run["bf16"], compiled_run["bf16_hybrid"]
    assert run["dtype"] == hybrid["dtype"] == "torch.bfloat16"
    # Factored steps: a request's tokens do not depend on its batch.
    assert run["batch"] == run["alone"], "bf16: a request in the mixed batch vs alone"
    stats, svd = run["info"]["stats"], run["info"]["worker_stats"]
    assert svd["svd_misses"] == 7 * tiny_world.CONFIG["num_hidden_layers"]  # new weights
    assert stats["factored"] > 0 and stats["merges"] == 0
    # Hybrid: single-mixture steps run a merged bf16 W' (alone), mixed ones the factors.
    hstats = hybrid["info"]["stats"]
    assert hybrid["info"]["worker_stats"]["svd_hits"] == svd["svd_misses"]
    assert hstats["merges"] > 0 and hstats["merged"] > 0 and hstats["factored"] > 0
    assert hybrid["batch"] == run["batch"]
    requests = [(p, plan.hf_spec(s)) for p, s in plan.BATCH]
    for name, tokens in [("batch", run["batch"]), ("hybrid alone", hybrid["alone"])]:
        gaps = tiny_world.greedy_gaps(world, requests, tokens)
        assert max(gaps) <= BF16_LOGIT_GAP, f"bf16 {name} vs the float32 reference: {gaps}"
    # The mixtures are applied (a wrong one is far off) and change the output.
    swapped = [(p, "code" if s == "math" else "math") for p, s in requests[1:3]]
    assert min(tiny_world.greedy_gaps(world, swapped, run["batch"][1:3])) > 10 * BF16_LOGIT_GAP
    same_prompt = [i for i, (p, _) in enumerate(plan.BATCH) if p == plan.PROMPTS[1]]
    assert len({tuple(run["batch"][i]) for i in same_prompt}) == len(same_prompt)


@pytest.mark.slow
def test_prefix_cache_never_crosses_mixtures(main_run, hf):
    pref = main_run["prefix"]
    for k, (spec, row) in enumerate(zip(plan.PREFIX_SPECS, pref)):
        assert row["tokens"] == hf["prefix"][k], f"shared prefix served with {spec}"
    # base filled the cache; math and code must not reuse it; the second math reuses its own.
    assert pref[1]["cached"] == 0 and pref[2]["cached"] == 0
    assert pref[3]["cached"] > 0
    assert pref[1]["tokens"] != pref[0]["tokens"] != pref[2]["tokens"]


@pytest.mark.slow
def test_bad_requests_rejected_at_front_end_engine_keeps_serving(main_run):
    expected = ["unknown expert 'nope'", "expected 2", "finite", "finite", "'alpha' must be",
                "unknown key", "not both", "must be a number"]
    assert len(main_run["errors"]) == len(plan.BAD_SPECS) == len(expected)
    for err, want in zip(main_run["errors"], expected):
        assert err["error"] is not None, f"{err['spec']} was accepted"
        assert want in err["error"], (err["spec"], err["error"])
        assert err["type"] == "T2RequestError" and err["is_value_error"]
        assert "extra_args['t2']" in err["error"]
    assert "nope" in main_run["batch_error"]
    assert main_run["after_errors"] == main_run["batch"][:2]
    assert main_run["info_end"]["worker_stats"]["rejected_in_worker"] == 0


@pytest.mark.slow
def test_an_expert_of_another_model_fails_the_start_with_its_reason(main_run):
    """Raised by the start itself (vLLM's multiprocess layout: the check fails in the worker),
    not only written in the middle of the worker's log."""
    err = main_run["other_model_error"]
    assert err is not None, "an expert of another model was loaded"
    assert err.startswith("vLLM did not start: expert file ") and \
        "was trained on another base model" in err and "allow_other_model=True" in err


@pytest.mark.slow
def test_poisoned_expert_cannot_change_other_requests(main_run, compiled_run):
    # z = 1e30 in the bank (behind every check): that request's activations overflow; nobody
    # else's tokens change, alone or batched, eager (merged and factored steps) or compiled,
    # and no non-finite number reaches the KV cache (whose blocks other requests reuse).
    for run in (main_run["poison"], compiled_run["compiled_poison"]):
        assert run["batch"] == run["reference"]
        assert run["after"] == run["reference"]
        assert run["kv_finite"] == [True]
        assert len(run["alone"][0]) == plan.MAX_TOKENS
        # the poison was served: its rows are not the source expert's answers
        assert run["alone"][0] != run["unpoisoned"][0]
        assert all(p != u for p, u in zip(run["poisoned"], run["unpoisoned"], strict=True))


@pytest.mark.slow
def test_expert_banks_load_and_unload_at_run_time(main_run, hf):
    assert main_run["unload"] == ["math"]
    assert "unknown expert 'code'" in main_run["unloaded_error"]
    assert main_run["reload"] == ["math", "code"]
    code_rows = [i for i, (_, s) in enumerate(plan.BATCH) if "code" in json.dumps(s)]
    assert main_run["reloaded"] == [main_run["batch"][i] for i in code_rows]
    assert main_run["load_objects"] == ["math", "code", "neg", "ones"]
    assert main_run["objects"] == hf["objects"]
    assert main_run["info_end"]["experts"] == ["math", "code", "neg", "ones"]


@pytest.mark.slow
def test_svd_computed_once_and_shared_with_patch_model(main_run, compiled_run, hf):
    n = len(main_run["info_start"]["targets"])
    assert n == 7 * tiny_world.CONFIG["num_hidden_layers"]
    assert main_run["info_start"]["worker_stats"]["svd_misses"] == n  # fresh cache: computed
    assert compiled_run["compiled_info"]["worker_stats"]["svd_hits"] == n  # restart: from disk
    assert compiled_run["compiled_info"]["worker_stats"]["svd_misses"] == 0
    assert hf["cache_hits"] == n  # patch_model finds the same matrices under the same keys


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallel needs two CPUs")
def test_tensor_parallel_two_ranks_matches_hf(world, main_run, hf):
    run = _run_engines("tp", world)
    assert run["batch"] == hf["batch"] == main_run["batch"]
    n = 7 * tiny_world.CONFIG["num_hidden_layers"]
    rank0, rank1 = ({**i["stats"], **i["worker_stats"]} for i in run["info"])
    assert rank0["svd_hits"] + rank0["svd_misses"] == n and rank0["svd_from_rank0"] == 0
    assert rank1["svd_from_rank0"] == n and rank1["svd_hits"] + rank1["svd_misses"] == 0
    assert rank0["factored"] > 0 and rank0["factored"] == rank1["factored"]
    assert run["unload"] == ["math"] and run["load"] == ["math", "code"]
    assert [i["experts"] for i in run["info"]] == [["math", "code"]] * 2
    code_rows = [i for i, (_, s) in enumerate(plan.BATCH) if "code" in json.dumps(s)]
    assert run["reloaded"] == [hf["batch"][i] for i in code_rows]


@pytest.mark.slow
def test_plain_vllm_is_unchanged_by_the_plugin(compiled_run):
    # The plugin is installed (entry point) but the vanilla engine did not opt in: a t2 request
    # is neither validated nor served with an expert.
    assert compiled_run["vanilla_ignores_t2"][0] == compiled_run["vanilla"][0]


# ------------------------------------------------------------------------------------------
# Fast checks (no engine)
# ------------------------------------------------------------------------------------------
def test_parse_request_forms_and_errors():
    from t2fast.mixtures import MixtureBounds
    from t2fast.vllm.frontend import T2RequestError, parse_request

    names, L = ["math", "code"], 2

    def normal(raw, bounds=None):
        return parse_request(raw, names, L, bounds).normal

    assert normal(None) is None
    assert normal({}) is None
    assert normal({"expert": "base"}) is None
    assert normal({"alpha": {"base": 1}}) is None
    assert normal("math") == {"math": 1.0}
    same = [parse_request({"expert": "math"}, names, L),
            parse_request({"alpha": {"math": 1.0, "code": 0}}, names, L),
            parse_request({"alpha": [1, 0]}, names, L),
            parse_request({"alpha": [[1, 0], [1, 0]]}, names, L)]
    assert len({m.key for m in same}) == 1
    assert normal({"alpha": [[1, 0], [0.5, 0.5]]}) == {"code": [0.0, 0.5], "math": [1.0, 0.5]}
    assert normal({"alpha": {"base": 0}}) == {"base": 0.0}
    assert normal({"alpha": {"math": [1, 0.5], "code": 0.5}}) == {"code": 0.5,
                                                                 "math": [1.0, 0.5]}
    envelope = parse_request({"alpha": [0.25, 0]}, names, L).envelope()
    assert normal(envelope) == {"math": 0.25}       # a reused SamplingParams is read again
    for bad, msg in [({"expert": "x"}, "unknown expert"), ({"alpha": [1]}, "expected 2"),
                     ({"alpha": [1, math.nan]}, "finite"), ({"alpha": {"math": math.inf}},
                                                            "finite"),
                     ({"alpha": [[1, 0]]}, "shape (2, 2)"), ({"alpha": {"math": [1]}},
                                                             "2 decoder layers"),
                     ({"alpha": [True, 0]}, "number"), (3, "must be a dict"),
                     ({"expert": 1}, "strings"), ({"foo": 1}, "unknown key"),
                     ({"alpha": [0, 0]}, "all zero"), ({"alpha": {}}, "all zero"),
                     ({"alpha": [1e30, 0]}, "bound |α| ≤ 4"), ({"alpha": [3, 3]}, "Σ|α| ≤ 5"),
                     ({"alpha": ["0.5", 0]}, "number"), ({"alpha": "math"}, "use 'expert'"),
                     ({"expert": "math", "v": 1}, "'v' is the version of the front end's"),
                     ({"alpha": [1, 0], "v": 2}, "got 2"), ({"alpha": [1, 0], "v": "1"},
                                                           "got '1'"),
                     ({"alpha": [1, 0], "v": True}, "got True")]:
        with pytest.raises(T2RequestError, match=re.escape(msg)):
            normal(bad, MixtureBounds(max_abs=4, max_l1=5))


def test_flat_and_json_request_forms_for_the_openai_server():
    from t2fast.mixtures import extract_spec
    from t2fast.vllm.frontend import T2RequestError, parse_request

    names = ["math", "code"]
    assert extract_spec(None) == (False, None)
    assert extract_spec({"other": 1}) == (False, None)
    assert extract_spec({"t2_expert": "math"}) == (True, {"expert": "math"})
    present, raw = extract_spec({"t2_alpha": [0.3, 0.7]})
    assert present and parse_request(raw, names, 2).normal == {"code": 0.7, "math": 0.3}
    present, raw = extract_spec({"t2": '{"alpha": {"math": 0.3}}'})
    assert parse_request(raw, names, 2).normal == {"math": 0.3}
    with pytest.raises(T2RequestError, match="not valid JSON"):
        parse_request("{alpha", names, 2)


def test_misspelled_or_repeated_request_keys_are_errors():
    from types import SimpleNamespace

    from t2fast.vllm.frontend import T2RequestError, request_spec_of

    assert request_spec_of(SimpleNamespace(extra_args=None)) == (False, None)
    assert request_spec_of(SimpleNamespace(extra_args={"t2_expert": "math",
                                                       "kv_transfer_params": {}})) == (
        True, {"expert": "math"})
    for bad, msg in [({"t2_experts": "math"}, "unknown key"), ({"T2-alpha": [1]}, "unknown key"),
                     ({"t2_adapt": "prompt"}, "t2fast serve"),
                     ({"t2": "math", "t2_expert": "code"}, "not several"),
                     ({"t2_expert": "math", "t2_alpha": [1, 0]}, "not several")]:
        with pytest.raises(T2RequestError, match=msg):
            request_spec_of(SimpleNamespace(extra_args=bad))


def test_salt_depends_on_mixture_and_expert_contents():
    from t2fast.vllm.frontend import FrontEnd, combine_salt

    fe = FrontEnd(num_layers=2, max_experts=4)
    fe.add("math", "d1")
    fe.add("code", "d2")
    s_math = fe.salt(fe.parse({"expert": "math"}))
    assert fe.salt(fe.parse(None)) is None
    assert s_math == fe.salt(fe.parse({"alpha": [1, 0]}))
    assert s_math != fe.salt(fe.parse({"expert": "code"}))
    assert s_math != fe.salt(fe.parse({"alpha": [1, 1e-3]}))
    fe.add("math", "d1-retrained")
    assert fe.salt(fe.parse({"expert": "math"})) != s_math
    assert combine_salt(None, None) is None and combine_salt("", None) is None
    # every salted request's salt is a digest of (client salt, mixture salt): a client cannot
    # give a base request a mixture's salt, nor a mixture request another's
    salts = [combine_salt(None, s_math), combine_salt(s_math, None), combine_salt("u", s_math),
             combine_salt(f"u|{s_math}", None), combine_salt("u", None)]
    assert len(set(salts)) == len(salts) and all(s.startswith("t2fast-") for s in salts)
    assert combine_salt("u", s_math) == combine_salt("u", s_math)
    with pytest.raises(ValueError, match=r"holds 4 experts \(max_experts\)"):
        for i in range(3):
            fe.add(f"e{i}", "d")


def test_targets_selection_matches_patch_model():
    from t2fast.vllm.layers import FUSED_DEFAULT, hf_part_names, select_targets

    names = []
    for i in range(4):
        for fused in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                      "mlp.down_proj"):
            names += hf_part_names(f"model.layers.{i}.{fused}", FUSED_DEFAULT)
    assert names[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(select_targets(names)) == 28
    mlp_half = select_targets(names, "mlp", "second_half")
    assert mlp_half == [n for n in names if ".mlp." in n and int(n.split(".")[2]) >= 2]
    assert select_targets(names, ["q_proj", "model.layers.3.mlp.*"], [3]) == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"]
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        select_targets(names, "lm_head")
    # vLLM's own fused names stand for their parts, as on a Hugging Face Phi-3
    assert select_targets(names, ["qkv_proj", "o_proj"]) == [
        n for n in names if ".self_attn." in n]
    assert select_targets(names, "model.layers.1.mlp.gate_up_proj") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"targets \['nope'\] match no nn.Linear"):
        select_targets(names, ["q_proj", "nope"])


def test_config_and_engine_args(world):
    from t2fast.vllm import CONFIG_KEY, T2Config, engine_args

    cfg = T2Config.from_dict({"experts": "a.safetensors", "layers": {"start": 1, "stop": 3}})
    assert cfg.experts == ["a.safetensors"] and cfg.layers == (1, 3)
    assert T2Config.from_dict(json.dumps(cfg.to_dict())) == cfg
    with pytest.raises(ValueError, match="unknown settings"):
        T2Config.from_dict({"expert": []})
    with pytest.raises(ValueError, match="backend"):
        T2Config(backend="cuda")
    args = engine_args(str(world / "model"), [world / "experts" / "math.safetensors"],
                       targets="mlp", enforce_eager=True)
    assert args["hf_overrides"] == {"architectures": ["T2FastLlamaForCausalLM"]}
    assert args["additional_config"][CONFIG_KEY]["targets"] == "mlp"
    assert args["worker_extension_cls"] == "t2fast.vllm.worker.T2WorkerExtension"
    assert args["enforce_eager"] is True
    json.dumps(args["additional_config"])  # vLLM hashes it as JSON
    # what a worker would fail on after vLLM's start is refused before it (bare names, missing
    # files), and max_experts=0 is an error, not the default
    from t2fast.safetensors_io import T2FileError

    for bad in ("math", world / "nope.safetensors"):
        with pytest.raises(T2FileError, match="does not exist"):
            engine_args(str(world / "model"), [bad])
    with pytest.raises(T2FileError, match="does not exist"):          # experts of a config
        engine_args(str(world / "model"), config=T2Config(experts=["nope.safetensors"]))
    with pytest.raises(ValueError, match="max_experts=0: max_experts must be a positive int"):
        engine_args(str(world / "model"), max_experts=0)
    # Settings may also come through hf_overrides (a "t2fast" attribute of the HF config).
    from types import SimpleNamespace

    from t2fast.vllm.config import config_from_vllm

    vc = SimpleNamespace(additional_config={}, model_config=SimpleNamespace(
        hf_config=SimpleNamespace(t2fast={"targets": "attention", "max_experts": 2})))
    assert config_from_vllm(vc).targets == "attention" and config_from_vllm(vc).max_experts == 2
    vc.additional_config = {CONFIG_KEY: {"targets": "mlp"}}
    assert config_from_vllm(vc).targets == "mlp"


def test_plugin_register_is_idempotent_and_inert_for_other_models():
    from types import SimpleNamespace

    from vllm import ModelRegistry
    from vllm.v1.engine.input_processor import InputProcessor

    from t2fast.vllm.plugin import register
    from t2fast.vllm.frontend import frontend_of

    register()
    hook = InputProcessor.process_inputs
    register()
    assert InputProcessor.process_inputs is hook and hook._t2fast_hook
    assert "T2FastLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    plain = SimpleNamespace(vllm_config=SimpleNamespace(
        model_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))
    assert frontend_of(plain) is None


def test_pipeline_parallel_fails_clearly():
    from types import SimpleNamespace

    from t2fast.vllm.models import check_parallel

    cfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2,
                                                          tensor_parallel_size=1))
    with pytest.raises(NotImplementedError, match="pipeline_parallel_size=2"):
        check_parallel(cfg)
    tp2 = SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=2)
    check_parallel(SimpleNamespace(parallel_config=tp2, lora_config=None,
                                   speculative_config=SimpleNamespace(
                                       enable_adaptive_verification=False)))
    # refused at start-up: vLLM LoRA, and adaptive draft verification (it failed the engine
    # in its first trimmed step)
    with pytest.raises(NotImplementedError, match="LoRA adapters"):
        check_parallel(SimpleNamespace(parallel_config=tp2, lora_config=object()))
    with pytest.raises(NotImplementedError, match="adaptive draft verification"):
        check_parallel(SimpleNamespace(parallel_config=tp2, speculative_config=SimpleNamespace(
            enable_adaptive_verification=True)))


def front_end(raw, names=("math", "code"), num_layers=2):
    """``extra_args["t2"]`` as the front end hands it to the workers."""
    from t2fast.vllm.frontend import parse_request

    return parse_request(raw, list(names), num_layers).envelope()


def _runtime(max_num_seqs=4, max_tokens=32, num_layers=2, max_experts=3):
    from types import SimpleNamespace

    from t2fast.vllm.config import T2Config
    from t2fast.vllm.runner import T2Runtime

    vc = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=max_tokens),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=num_layers),
                                     enforce_eager=True),
        device_config=SimpleNamespace(device="cpu"))
    rt = T2Runtime(vc, T2Config(max_experts=max_experts, backend="torch", hybrid=True))
    rt.bank.names, rt.bank.row_of = ["math", "code"], {"math": 1, "code": 3}  # rows may skip
    return rt


def test_step_metadata_token_map_alpha_table_and_modes():
    import numpy as np

    rt = _runtime()
    specs = {"a": (False, None), "b": (True, front_end({"expert": "math"})),
             "c": (True, front_end({"alpha": {"math": 0.25, "code": [0.5, 1.0]}})),
             "d": (True, front_end({"expert": "math"})), "e": (True, {"expert": "math"})}
    rt.prepare_step(["a", "b", "c", "d"], specs.__getitem__, np.array([3, 1, 2, 1]))
    assert rt.mode == "factored"
    assert rt.slot_map[:7].tolist() == [0, 0, 0, 1, 2, 2, 1]
    assert rt.slot_map[7:].abs().sum() == 0
    a = rt.alpha
    assert a[:, 0].tolist() == [[1, 0, 0, 0]] * 2                 # slot 0: base
    assert a[:, 1].tolist() == [[0, 1, 0, 0]] * 2                 # slot 1: math (row 1)
    assert a[0, 2].tolist() == [0, 0.25, 0, 0.5] and a[1, 2].tolist() == [0, 0.25, 0, 1.0]
    # Fewer tokens next step: the tail goes back to the base slot; one mixture -> "merged".
    rt.prepare_step(["b", "d"], specs.__getitem__, [1, 1])
    assert rt.mode == "merged" and rt.slot_map[:7].tolist() == [1, 1, 0, 0, 0, 0, 0]
    rt.prepare_step(["a"], specs.__getitem__, [5])
    assert rt.mode == "base"
    # A spec that skipped the front end is served with the base model, not raised, and a
    # forged envelope with weights beyond the bounds too: only the front end's mixtures place.
    specs["f"] = (True, {"alpha": {"math": 1e6}, "v": 1})
    rt.prepare_step(["e", "b", "f"], specs.__getitem__, [1, 1, 1])
    assert rt.slot_map[:3].tolist() == [0, 1, 0] and rt.worker_stats["rejected_in_worker"] == 2
    assert float(rt.alpha.abs().max()) <= 1.0
    assert rt.stats["factored"] == 2 and rt.stats["merged"] == 1 and rt.stats["base"] == 1
    # a request ID back with other parameters (a streamed input's next chunk, a reused ID) is
    # read anew: it kept the mixture of its first parameters
    specs["b"] = (True, front_end({"expert": "code"}))
    rt.prepare_step(["b"], specs.__getitem__, [1])
    assert rt.alpha[0, rt.slot_map[0]].tolist() == [0, 0, 0, 1]
    specs["b"] = (False, None)
    rt.prepare_step(["b"], specs.__getitem__, [1])
    assert rt.mode == "base"


def test_v2_runner_hook_steps():
    from types import SimpleNamespace

    import numpy as np

    from t2fast.vllm.runner import v2_forget_finished, v2_prepare_step, v2_record_new_requests

    rt, specs = _runtime(), {}
    code = front_end({"expert": "code"})
    new = [SimpleNamespace(req_id="r1", sampling_params=SimpleNamespace(
               extra_args={"t2": code})),
           SimpleNamespace(req_id="r2", sampling_params=SimpleNamespace(extra_args=None)),
           SimpleNamespace(req_id="r3", sampling_params=None)]
    v2_record_new_requests(specs, SimpleNamespace(scheduled_new_reqs=new))
    assert specs == {"r1": (True, code), "r2": (False, None),
                     "r3": (False, None)}
    batch = SimpleNamespace(num_reqs=2, req_ids=["r2", "r1", "pad"],
                            num_scheduled_tokens=np.array([2, 3, 0]), num_tokens=5)
    v2_prepare_step(rt, batch, specs)
    assert rt.slot_map[:6].tolist() == [0, 0, 1, 1, 1, 0]
    assert rt.alpha[0, 1].tolist() == [0, 0, 0, 1]
    v2_forget_finished(specs, SimpleNamespace(finished_req_ids={"r1", "zz"}))
    assert set(specs) == {"r2", "r3"}
    with pytest.raises(RuntimeError, match="adaptive draft verification"):
        v2_prepare_step(rt, SimpleNamespace(num_reqs=1, req_ids=["r2"],
                                            num_scheduled_tokens=np.array([4]), num_tokens=3),
                        specs)


def test_svf_custom_op_compiles_with_dynamic_token_count():
    """The kernels' custom op (what the vLLM layers call on the Triton path) in a compiled graph
    with a dynamic token count."""
    import torch

    from t2fast import ops
    from t2fast.triton_import import register_custom_ops

    register_custom_ops()        # registers torch.ops.t2fast.* (whatever ran before this test)
    g = torch.Generator().manual_seed(0)
    U, S, Vh = (torch.randn(24, 16, generator=g), torch.rand(16, generator=g),
                torch.randn(16, 32, generator=g))
    alpha = torch.rand(5, 3, generator=g)
    bank = torch.rand(3, 16, generator=g)
    slots = torch.randint(0, 5, (64,), generator=g, dtype=torch.int32)

    def f(x):
        y = torch.ops.t2fast.svf_matmul_mix_triton(x, U, S, Vh, alpha, bank, slots[:x.shape[0]])
        return y * 2

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for T in (3, 7, 40):
        x = torch.randn(T, 32, generator=g)
        want = ops.svf_matmul_mix(x, U, S, Vh, alpha, bank, slots[:T], backend="torch") * 2
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)

def test_llm_checks_max_experts_before_the_engine(world, monkeypatch):
    """max_experts=0 became the default 8 and -1 the number of experts; the bank holds at
    least the experts given."""
    import vllm

    from t2fast.vllm import LLM

    class Started(Exception):
        pass

    seen = {}

    def engine(**kwargs):
        seen.update(kwargs)
        raise Started
    monkeypatch.setattr(vllm, "LLM", engine)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_experts={bad}: max_experts must be a "
                                             f"positive int"):
            LLM(str(world / "model"), max_experts=bad)
    files = [world / "experts" / f"{n}.safetensors" for n in plan.FILE_EXPERTS]
    with pytest.raises(Started):
        LLM(str(world / "model"), files, max_experts=1)
    assert seen["additional_config"]["t2fast"]["max_experts"] == len(plan.FILE_EXPERTS)


def test_llm_bank_holds_the_config_files_and_the_expert_objects(monkeypatch):
    """experts=[Expert objects] beside config=T2Config(experts=[files]): the bank was sized
    for the objects alone, and the engine started, then failed to load them."""
    import vllm

    from t2fast.experts import load_expert
    from t2fast.models import tiny_experts, tiny_model_path
    from t2fast.vllm import LLM
    from t2fast.vllm.config import CONFIG_KEY, T2Config

    started = {}

    class Engine:
        def __init__(self, **kwargs):
            started.update(kwargs)
    monkeypatch.setattr(vllm, "LLM", Engine)
    monkeypatch.setattr(LLM, "_find_frontend", lambda self: None)
    monkeypatch.setattr(LLM, "load_experts", lambda self, objects: None)
    shipped = tiny_experts()
    LLM(tiny_model_path(), experts=[load_expert(shipped["classify"])],
        config=T2Config(experts=[str(shipped["arith"]), str(shipped["strings"])],
                        max_experts=2))
    assert started["additional_config"][CONFIG_KEY]["max_experts"] == 3
