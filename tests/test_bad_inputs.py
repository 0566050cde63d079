"""A battery of bad inputs across ops, files, the SVD cache, mixtures and the CLI.

Every case asserts the exception type, that the message names the problem, and that the patched
model afterwards gives bit-identical logits for the mixture it was serving (state intact).
"""
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t2fast
from t2fast import cli, ops
from t2fast.experts import Expert
from t2fast.layers import SVFLinear
from t2fast.models import random_tiny_llama
from t2fast.safetensors_io import T2FileError

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
SHIPPED = Path(__file__).resolve().parents[1] / "experts"
IDS = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    return random_tiny_llama(seed=seed, **TINY).eval()


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(ids).logits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A patched model with experts a and b serving rows ["a", {"a": 0.5, "b": 0.5}], the
    logits of that state, and a folder of expert files (good and bad)."""
    d = tmp_path_factory.mktemp("bad")
    model = _model()
    h = t2fast.patch_model(model, cache_dir=d / "svd", hybrid=False, progress=False)
    f = h.decomposition.factors
    files = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        files[name] = h.new_expert(name, Expert.random(name, f, 0.5, seed).z).save(
            d / f"{name}.safetensors")
    h.add_experts([files["a"], files["b"]])
    rows = ["a", {"a": 0.5, "b": 0.5}]
    h.set_mixture(rows=rows)
    ref = _logits(model)

    def raw(stem, z=None, **meta):
        from safetensors.torch import save_file
        zs = z or {n: torch.ones(v.rank) for n, v in f.items()}
        md = {"format": "t2fast-expert", "format_version": "1", "name": stem, **meta}
        save_file(zs, str(d / f"{stem}-raw.safetensors"), metadata=md)
        return d / f"{stem}-raw.safetensors"

    t0 = h.targets[0]
    ones = {n: torch.ones(v.rank) for n, v in f.items()}
    files["nan"] = raw("nan", {**ones, t0: torch.full((f[t0].rank,), float("nan"))})
    files["huge"] = raw("huge", {**ones, t0: torch.full((f[t0].rank,), 1e30)})
    files["path_name"] = raw("pn", name="../../etc/passwd")
    files["targets_type"] = raw("tt", targets_json='"abc"')
    files["extra_type"] = raw("et", extra_json="[1]")
    files["dup_a"] = raw("a")
    trunc = d / "trunc.safetensors"
    trunc.write_bytes(files["c"].read_bytes()[:-40])
    files["trunc"] = trunc
    pkl = d / "pickled.safetensors"
    pkl.write_bytes(pickle.dumps({"x": 1}))
    files["pickle"] = pkl
    other = t2fast.decompose_model(_model(seed=7), cache_dir=False, progress=False)
    files["foreign"] = Expert.random("foreign", other.factors).save(d / "foreign.safetensors")
    return dict(model=model, handle=h, rows=rows, ref=ref, files=files, dir=d)


def _case(world, call, error, pattern):
    h = world["handle"]
    names = list(h.expert_names)
    with pytest.raises(error, match=pattern):
        call(h, world["files"])
    assert h.expert_names == names, "a failed call must not change the bank"
    assert torch.equal(_logits(world["model"]), world["ref"]), "logits changed"


MIXTURES = [
    ({"a": True}, TypeError, r"alpha\['a'\] must be a number, got True"),
    ({"a": "0.5"}, TypeError, r"alpha\['a'\] must be a number, got '0.5'"),
    ({"a": float("nan")}, ValueError, r"alpha\['a'\] must be finite, got nan"),
    ({"a": 1e30}, ValueError, r"alpha\['a'\] = 1e\+30 is outside the bound \|α\| ≤ 4"),
    ({"a": 10 ** 400}, ValueError, r"alpha\['a'\] must be finite, got an integer of about 401"),
    ({"a": 4, "b": 4, "base": 1}, ValueError, r"Σ\|α\| = 9 is outside the bound Σ\|α\| ≤ 8"),
    ({}, ValueError, r"all zero"),
    ([0.0, 0.0], ValueError, r"all zero"),
    ("c", ValueError, r"unknown expert 'c'; loaded experts: \['a', 'b'\]"),
    ([0.5, 0.2, 0.3], ValueError, r"alpha has 3 weights; expected 2"),
    ([[1.0, 0.0]] * 3, ValueError, r"per-layer alpha must have shape \(2, 2\)"),
    ({"a": [1.0, 0.5, 0.2]}, ValueError, r"per-layer list of 3 weights; the model has 2"),
    (3.5, TypeError, r"a mixture must be None, 'base', an expert name"),
]


@pytest.mark.parametrize("spec, error, pattern", MIXTURES, ids=[repr(m[0])[:30] for m in MIXTURES])
def test_bad_mixture(world, spec, error, pattern):
    _case(world, lambda h, f: h.set_mixture(rows=[spec, "a"]), error, pattern)
    _case(world, lambda h, f: h.merge(spec), error, pattern)


FILES = [
    ("nan", T2FileError, r"nan-raw\.safetensors'.*contains NaN or Inf"),
    ("huge", T2FileError, r"huge-raw\.safetensors'.*\|z\| = 1e\+30, outside the allowed range"),
    ("path_name", T2FileError, r"expert name '\.\./\.\./etc/passwd' is not valid"),
    ("targets_type", T2FileError, r"tt-raw\.safetensors'.*field 'targets' must be a list"),
    ("extra_type", T2FileError, r"et-raw\.safetensors'.*field 'extra' must be a JSON object"),
    ("dup_a", ValueError, r"\['a'\] are already loaded.*replace=True"),
    ("trunc", T2FileError, r"trunc\.safetensors' is not a readable safetensors file"),
    ("pickle", T2FileError, r"pickled\.safetensors' is a zip or pickle file \(torch\.save's "
                            r"formats\), not a safetensors file"),
    ("foreign", T2FileError, r"foreign\.safetensors' was trained on another base model"),
]


@pytest.mark.parametrize("key, error, pattern", FILES, ids=[f[0] for f in FILES])
def test_bad_expert_file(world, key, error, pattern):
    # the good expert c is listed first: nothing of a failed call may reach the bank
    _case(world, lambda h, f: h.add_experts([f["c"], f[key]]), error, pattern)


def test_missing_file_and_wrong_object(world):
    _case(world, lambda h, f: h.add_experts([world["dir"] / "missing.safetensors"]),
          T2FileError, r"missing\.safetensors' does not exist")
    _case(world, lambda h, f: h.add_experts([42]), TypeError, r"got int")
    _case(world, lambda h, f: h.add_experts({"a": f["a"]}), TypeError,
          r"got a dict; pass a list")
    short = {n: torch.ones(3) for n in world["handle"].targets}
    _case(world, lambda h, f: h.add_experts([Expert("s", short)]), T2FileError,
          r"expert 's': z for .* has shape \(3,\), but that matrix has rank")


def test_wrong_batch_rows_and_trainable_z(world):
    _case(world, lambda h, f: _logits(world["model"], IDS.repeat(2, 1)), ValueError,
          r"mixture was set for 2 batch rows, but the input has leading shape \(4, 5\).* "
          r"\(if this comes from generate's num_beams / num_return_sequences, which repeat each "
          r"row 2 times in a row: give each mixture 2 times")
    _case(world, lambda h, f: h.set_trainable_z({n: torch.ones(2) for n in h.modules}),
          ValueError, r"set_trainable_z: z for .* has shape \(2,\), expected")
    _case(world, lambda h, f: h.set_mixture(rows=[]), ValueError, r"empty list of rows")
    partial = {n: torch.ones(layer.rank) for n, layer in list(world["handle"].modules.items())[:-1]}
    _case(world, lambda h, f: h.set_trainable_z(partial), ValueError,
          r"set_trainable_z: no z given for target model\.layers\.1\.mlp\.down_proj")
    elsewhere = {n: torch.ones(layer.rank, device="meta")
                 for n, layer in world["handle"].modules.items()}
    _case(world, lambda h, f: h.set_trainable_z(elsewhere), ValueError,
          r"set_trainable_z: z for .* is on meta, the layer on cpu")


def test_weights_without_values_are_refused_before_the_svd():
    model = _model()
    model.model.layers[1].mlp.down_proj.to("meta")
    with pytest.raises(ValueError, match=r"1 target weights hold no values \(on the meta "
                                         r"device.*\['model\.layers\.1\.mlp\.down_proj'\]"):
        t2fast.patch_model(model, cache_dir=False, progress=False)
    assert not any(isinstance(m, SVFLinear) for m in model.modules())


def test_ops_reject_bad_arguments(world):
    layer = next(iter(world["handle"].modules.values()))
    x = torch.randn(3, layer.in_features)
    idx = torch.zeros(3, dtype=torch.int32)
    Z = torch.ones(2, layer.rank)
    _case(world, lambda h, f: ops.svf_matmul(x[:, :-1], layer.U, layer.S, layer.Vh,
                                             Z, idx), ValueError,
          r"x has shape \(3, 31\): its last dimension must equal Vh\.shape\[1\] = 32")
    _case(world, lambda h, f: ops.svf_matmul(x, layer.U, layer.S, layer.Vh, Z,
                                             idx + 5), ValueError,
          r"idx values must lie in \[0, 2\)")


def test_saving_per_row_state_refused(world, tmp_path):
    _case(world, lambda h, f: world["model"].save_pretrained(tmp_path / "m"), RuntimeError,
          r"per-row mixtures.*handle\.merge\(spec\).*handle\.restore\(\)")


def test_failed_patch_model_leaves_the_model_untouched(world):
    files = world["files"]
    model = _model()
    keys = list(model.state_dict())
    before = _logits(model)
    patterns = {key: pattern for key, _, pattern in FILES}
    for bad in ("nan", "path_name", "foreign"):
        with pytest.raises(T2FileError, match=patterns[bad]):
            t2fast.patch_model(model, experts=[files["c"], files[bad]],
                               cache_dir=world["dir"] / "svd", progress=False)
        assert not any(isinstance(m, SVFLinear) for m in model.modules())
        assert list(model.state_dict()) == keys
        assert torch.equal(_logits(model), before)
    with pytest.raises(TypeError, match="mixture_bounds must be"):
        t2fast.patch_model(model, mixture_bounds=(4, 8), cache_dir=world["dir"] / "svd")
    assert not any(isinstance(m, SVFLinear) for m in model.modules())
    with pytest.raises(ValueError, match="more than once"):
        t2fast.patch_model(model, experts=[files["c"], files["c"]],
                           cache_dir=world["dir"] / "svd", progress=False)
    assert not any(isinstance(m, SVFLinear) for m in model.modules())
    t2fast.patch_model(model, experts=[files["c"]], cache_dir=world["dir"] / "svd",
                       progress=False).restore()


def test_damaged_cache_entry_is_recomputed_with_the_same_answers(world):
    from t2fast.decompose import SVDCache, weight_hash
    model = _model()
    before = _logits(model)
    cache = SVDCache(world["dir"] / "svd")
    name = "model.layers.0.self_attn.q_proj"
    path = cache.path(weight_hash(model.get_submodule(name).weight))
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as fh:
        meta, t = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    t["U"][0, 0] = float("nan")
    save_file(t, str(path), metadata=meta)
    with pytest.warns(UserWarning, match=r"ignoring SVD cache file .*U contains NaN"):
        h = t2fast.patch_model(model, experts=[world["files"]["a"]], progress=False,
                               cache_dir=world["dir"] / "svd", hybrid=False)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    h.restore()


@pytest.mark.parametrize("args, pattern", [
    (["eval", "--task", "arith", "--model", "random:0:1", "--expert", "nope.safetensors"],
     r"nope\.safetensors' does not exist"),
    (["eval", "--task", "no_such_task", "--model", "random:0:1"], r"no_such_task"),
    (["eval", "--task", "arith", "--model", "random:0:1", "--lora",
      str(SHIPPED / "arith.safetensors")],
     r"arith\.safetensors' is not a LoRA adapter folder .*use --expert"),
    (["eval", "--task", "arith", "--model", "random:0:1", "--lora", "no/such/adapter"],
     r"--lora 'no/such/adapter' does not exist"),
    (["eval", "--task", "arith", "--model", "random:0:1", "--lora", "WEIGHTLESS"],
     r"has an adapter_config\.json but no weights \(adapter_model\.safetensors or "
     r"adapter_model\.bin\)"),
    (["eval", "--task", "arith", "--model", "random:0:1", "--expert",
      str(SHIPPED / "baselines" / "lora_sft_arith")], r"is a PEFT LoRA adapter folder"),
    (["import-official", "none.pt", "--model", "random:0:1", "--out", "x.safetensors"],
     r"official checkpoint 'none\.pt' does not exist"),
])
def test_cli_errors(world, args, pattern, capsys, tmp_path):
    if "WEIGHTLESS" in args:            # a LoRA folder of a config alone: PEFT asked the Hub
        (tmp_path / "adapter_config.json").write_text(
            (SHIPPED / "baselines" / "lora_sft_arith" / "adapter_config.json").read_text())
        args = [str(tmp_path) if a == "WEIGHTLESS" else a for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert torch.equal(_logits(world["model"]), world["ref"])


def test_python_m_t2fast_reports_errors_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "t2fast", "eval", "--task", "arith", "--model",
                        "random:0:1", "--expert", "nope.safetensors"], capture_output=True,
                       text=True, timeout=300, cwd=SHIPPED.parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nope.safetensors' does not exist" in r.stderr


def test_vllm_front_refuses_bad_experts_before_the_workers(world):
    """``t2fast.vllm.LLM.load_experts`` checks names, z and duplicates before any RPC."""
    from t2fast.vllm.frontend import FrontEnd
    from t2fast.vllm.llm import LLM

    llm = LLM.__new__(LLM)
    llm._frontend = FrontEnd(num_layers=2, max_experts=4)
    llm._frontend.add("a", "digest")
    llm._rpc = lambda *a: pytest.fail("reached the workers")
    z = {n: torch.full((l.rank,), 1e30) for n, l in world["handle"].modules.items()}
    files = world["files"]
    for experts, error, pattern in [
            ([Expert("huge", z)], T2FileError, r"expert 'huge': z for .* outside the allowed"),
            ([files["nan"]], T2FileError, r"contains NaN or Inf"),
            ([files["path_name"]], T2FileError, r"is not valid"),
            ([files["c"], files["c"]], ValueError, r"\['c'\] appear more than once"),
            ([files["a"]], ValueError, r"\['a'\] are already loaded.*replace=True")]:
        with pytest.raises(error, match=pattern):
            llm.load_experts(experts)
    assert llm.expert_names == ["a"]


def test_training_refuses_an_invalid_expert_name_before_it_starts():
    from t2fast.train import TrainConfig
    with pytest.raises(ValueError, match=r"TrainConfig\.out=.*the expert name 'my expert' is "
                                         r"not valid"):
        TrainConfig(task="arith", out="x/my expert.safetensors").validate()


def test_a_damaged_model_folder_is_named(tmp_path, capsys):
    """A truncated model.safetensors was a SafetensorError traceback; a folder without a
    tokenizer asked to install sentencepiece."""
    import shutil

    from t2fast.models import tiny_model_path

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path(), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    args = ["eval", "--task", "arith", "--n", "1", "--model", str(folder)]
    assert cli.main(args) == 2
    assert re.search(r"t2fast eval: error: --model '.*model': .*", capsys.readouterr().err)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    assert cli.main(args) == 2
    assert "the folder holds no tokenizer (none of tokenizer.json," in capsys.readouterr().err


def test_no_experts_may_be_given_as_none():
    handle = t2fast.patch_model(_model(), experts=None, cache_dir=False, progress=False)
    assert handle.expert_names == []        # before: 'NoneType' object is not iterable
    handle.restore()
