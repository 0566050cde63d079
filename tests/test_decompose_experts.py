"""Target selection, SVD cache, expert files and banks."""
import io
import json
import re
import sys

import pytest
import torch

from t2fast.decompose import (SVDCache, decompose_model, decompose_weight, relative_error,
                              weight_hash)
from t2fast.experts import Expert, Fingerprint, load_expert
from t2fast.mixtures import MixtureBounds
from t2fast.runtime import SVFRuntime
from t2fast.models import random_tiny_llama
from t2fast.safetensors_io import T2FileError
from t2fast.targets import resolve_targets

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    return random_tiny_llama(seed=1, **TINY)


@pytest.fixture(scope="module")
def decomp(model, tmp_path_factory):
    return decompose_model(model, cache_dir=tmp_path_factory.mktemp("svd"), progress=False)


# ---- targets ---------------------------------------------------------------------------------
def test_targets_presets_and_layers(model):
    all_t = resolve_targets(model)
    assert len(all_t) == 3 * 7 and all_t[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in all_t
    mlp = resolve_targets(model, "mlp", layers=(1, 3))
    assert mlp == [f"model.layers.{i}.mlp.{p}" for i in (1, 2)
                   for p in ("gate_proj", "up_proj", "down_proj")]
    assert resolve_targets(model, ["q_proj", "model.layers.2.mlp.*"], layers=[2]) == [
        "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.gate_proj",
        "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
    assert len(resolve_targets(model, "attention", layers="second_half")) == 2 * 4


@pytest.mark.parametrize("targets, layers, pattern", [
    ("nope_proj", None, r"no nn.Linear module matches"),
    ("all", (2, 5), r"layers \[3, 4\] are out of range.*3 decoder layers"),
    ([], None, r"targets must be"),
    ("all", 2.5, r"layers must be"),
])
def test_targets_errors(model, targets, layers, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_targets(model, targets, layers)


# ---- decomposition ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(17, 9), (9, 17), (300, 40)])
def test_decompose_weight_reconstructs(shape):
    w = torch.randn(*shape)
    f = decompose_weight(w)
    r = min(shape)
    assert f.U.shape == (shape[0], r) and f.S.shape == (r,) and f.Vh.shape == (r, shape[1])
    assert torch.all(f.S[:-1] >= f.S[1:]), "singular values must be descending"
    assert relative_error(w, f) < 1e-6


def test_cache_hits_on_second_run_and_recovers_from_corruption(model, tmp_path):
    first = decompose_model(model, "mlp", cache_dir=tmp_path, progress=False)
    assert first.cache_hits == 0 and len(list(tmp_path.glob("*.safetensors"))) == 9
    second = decompose_model(model, "mlp", cache_dir=tmp_path, progress=False)
    assert second.cache_hits == 9
    for n in first.factors:
        assert torch.equal(first.factors[n].S, second.factors[n].S)
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])          # truncate
    with pytest.warns(UserWarning, match=r"ignoring SVD cache file.*recomputing"):
        third = decompose_model(model, "mlp", cache_dir=tmp_path, progress=False)
    assert third.cache_hits == 8
    assert max(third.errors.values()) < 1e-5
    assert "9 matrices decomposed (8 from cache)" in third.report()


def _tamper(path, edit):
    """Rewrite a cache entry's tensors with ``edit(tensors)``, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(t)
    save_file(t, str(path), metadata=meta)


@pytest.mark.parametrize("edit, why", [
    (lambda t: t["U"].__setitem__((0, 0), float("nan")), r"U contains NaN or Inf"),
    (lambda t: t.__setitem__("S", t["S"] * 0.5), r"does not reconstruct the weight: probe error"),
    (lambda t: t.__setitem__("S", t["S"].flip(0)), r"not non-negative and descending"),
    (lambda t: t.__setitem__("Vh", t["Vh"][:, :-1].contiguous()),
     r"holds S \(32,\), U \(32, 32\), Vh \(32, 47\); expected .* for a weight of shape"),
    (lambda t: t.pop("Vh"), r"holds S \(32,\), U \(32, 32\); expected"),
    (lambda t: t.__setitem__("S", t["S"].double()), r"tensor 'S' is torch.float64"),
])
def test_cache_entry_is_checked_against_the_weight(model, tmp_path, decomp, edit, why):
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight
    cache = SVDCache(tmp_path)
    good, _ = cache.get_or_compute(w, name)
    path = cache.path(weight_hash(w))
    _tamper(path, edit)
    with pytest.warns(UserWarning, match=f"ignoring SVD cache file '{re.escape(str(path))}': .*"
                                         f"{why}.*recomputing"):
        f, hit = cache.get_or_compute(w, name)
    assert not hit and torch.equal(f.S, good.S)
    assert cache.get_or_compute(w, name)[1], "the recomputed entry replaces the bad one"


def test_tampered_sigma_does_not_blame_experts(model, tmp_path):
    d = decompose_model(model, "mlp", cache_dir=tmp_path, progress=False)
    e = Expert.random("math", d.factors, seed=3).save(tmp_path / "e" / "math.safetensors")
    for path in tmp_path.glob("*.safetensors"):
        _tamper(path, lambda t: t.__setitem__("S", t["S"] * 0.5))
    with pytest.warns(UserWarning, match="does not reconstruct"):
        again = decompose_model(model, "mlp", cache_dir=tmp_path, progress=False)
    assert again.cache_hits == 0 and max(again.errors.values()) < 1e-5
    assert load_expert(e, again.factors).name == "math"


def test_weight_with_nan_is_named(model):
    w = torch.randn(6, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"model\.x contains NaN or Inf"):
        decompose_weight(w, "model.x")


def test_cache_keyed_by_weight(tmp_path):
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    assert weight_hash(a) == weight_hash(a.clone()) != weight_hash(b)
    assert weight_hash(a) != weight_hash(a.double())
    cache = SVDCache(tmp_path)
    assert cache.get_or_compute(a)[1] is False
    assert cache.get_or_compute(a.clone())[1] is True
    assert cache.get_or_compute(b)[1] is False
    assert (cache.hits, cache.misses) == (1, 2)


# ---- expert files ----------------------------------------------------------------------------
def test_expert_roundtrip(decomp, tmp_path):
    e = Expert.random("math", decomp.factors, scale=0.2, seed=3, base_model="tiny")
    e.extra = {"steps": 10}
    path = e.save(tmp_path / "math.safetensors")
    back = load_expert(path, decomp.factors)
    assert back.name == "math" and back.base_model == "tiny" and back.extra == {"steps": 10}
    assert back.targets == decomp.targets
    for n in e.z:
        assert torch.equal(back.z[n], e.z[n])


def _edited(decomp, tmp_path, edit):
    e = Expert.random("x", decomp.factors, seed=1)
    edit(e)
    return e.save(tmp_path / "x.safetensors")


def test_expert_missing_and_extra_matrices(decomp, tmp_path):
    name = decomp.targets[0]
    p = _edited(decomp, tmp_path, lambda e: e.z.pop(name))
    with pytest.raises(T2FileError, match=r"missing 1 .*" + name.replace(".", r"\.")):
        load_expert(p, decomp.factors)
    p = _edited(decomp, tmp_path, lambda e: e.z.__setitem__("model.layers.9.mlp.up_proj",
                                                             torch.ones(4)))
    with pytest.raises(T2FileError, match=r"1 not adapted here.*layers\.9"):
        load_expert(p, decomp.factors)


def test_expert_wrong_length(decomp, tmp_path):
    name = decomp.targets[1]
    p = _edited(decomp, tmp_path, lambda e: e.z.__setitem__(name, torch.ones(3)))
    with pytest.raises(T2FileError, match=r"z for .* has shape \(3,\), but that matrix has rank"):
        load_expert(p, decomp.factors)


def test_expert_nan_refused_at_save_and_load(decomp, tmp_path):
    e = Expert.random("x", decomp.factors, seed=1)
    e.z[decomp.targets[0]][2] = float("nan")
    with pytest.raises(T2FileError, match="NaN or Inf"):
        e.save(tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({k: v for k, v in e.z.items()}, str(tmp_path / "raw.safetensors"),
              metadata={"format": "t2fast-expert", "format_version": "1"})
    with pytest.raises(T2FileError, match="NaN or Inf"):
        load_expert(tmp_path / "raw.safetensors")


def test_expert_truncated_missing_and_foreign_files(decomp, tmp_path):
    p = Expert.random("x", decomp.factors).save(tmp_path / "x.safetensors")
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(T2FileError, match=r"not a readable safetensors file \(truncated"):
        load_expert(p)
    with pytest.raises(T2FileError, match="does not exist"):
        load_expert(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(T2FileError, match=r"not a t2fast expert file"):
        load_expert(tmp_path / "other.safetensors")


@pytest.mark.parametrize("meta, pattern", [
    ({"name": "../../etc/passwd"}, r"expert name '\.\./\.\./etc/passwd' is not valid"),
    ({"name": "base"}, r"may not be 'base'"),
    ({"targets_json": "\"abc\""}, r"metadata field 'targets' must be a list"),
    ({"targets_json": "[1, 2]"}, r"metadata lists 2 targets"),
    ({"fingerprint_json": "3"}, r"metadata field 'fingerprint' must be"),
    ({"fingerprint_json": "{\"shapes\": \"x\"}"}, r"metadata field 'fingerprint' must be"),
    ({"fingerprint_json": "{\"shapes\": \"x\", \"sigma_sums\": {\"a\": \"1\"}}"},
     r"'fingerprint' must be"),
    ({"extra_json": "[1]"}, r"metadata field 'extra' must be a JSON object"),
    ({"base_model_json": "7"}, r"metadata field 'base_model' must be a string"),
])
def test_expert_metadata_of_the_wrong_type_names_file_and_field(decomp, tmp_path, meta, pattern):
    from safetensors import safe_open
    from safetensors.torch import save_file
    p = Expert.random("x", decomp.factors).save(tmp_path / "x.safetensors")
    with safe_open(str(p), framework="pt") as f:
        base, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k in meta:                      # replace the plain or the JSON form of the field
        base.pop(k.removesuffix("_json"), None)
        base.pop(k.removesuffix("_json") + "_json", None)
    save_file(t, str(p), metadata={**base, **meta})
    with pytest.raises(T2FileError, match=r"expert file '.*x\.safetensors'.*" + pattern):
        load_expert(p, decomp.factors)


def test_expert_z_out_of_range_refused(decomp, tmp_path):
    e = Expert.random("x", decomp.factors)
    e.z[decomp.targets[0]] *= 1e30
    with pytest.raises(T2FileError, match=r"outside the allowed range \[-8, 8\]"):
        e.save(tmp_path / "x.safetensors")
    with pytest.raises(T2FileError, match=r"outside the allowed range"):
        e.check_against(decomp.factors)


def test_invalid_expert_name_refused():
    with pytest.raises(ValueError, match="not valid"):
        Expert("a/b", {})


def test_expert_folder_roundtrip_and_checks(decomp, tmp_path):
    e = Expert.random("math", decomp.factors, scale=0.2, seed=3, base_model="tiny")
    folder = e.save_pretrained(tmp_path / "math-expert")
    cfg = json.loads((folder / "expert_config.json").read_text())
    assert cfg["format"] == "t2fast-expert" and cfg["base_model"] == "tiny"
    assert cfg["targets"] == decomp.targets
    back = load_expert(folder, decomp.factors)
    assert back.name == "math" and all(torch.equal(back.z[n], e.z[n]) for n in e.z)
    cfg["name"] = "code"
    (folder / "expert_config.json").write_text(json.dumps(cfg))
    with pytest.raises(T2FileError, match=r"says name = 'code' but expert\.safetensors holds"):
        load_expert(folder)
    (folder / "expert_config.json").write_text("{nope")
    with pytest.raises(T2FileError, match=r"expert_config\.json is not valid JSON"):
        load_expert(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T2FileError, match=r"not a t2fast expert folder.*expert_config\.json"):
        load_expert(empty)


def test_expert_for_another_model(decomp, tmp_path):
    other = decompose_model(random_tiny_llama(seed=2, **TINY), cache_dir=False, progress=False)
    p = Expert.random("x", other.factors).save(tmp_path / "x.safetensors")
    with pytest.raises(T2FileError, match=r"trained on another base model.*allow_other_model"):
        load_expert(p, decomp.factors)
    # cross-model transfer between equal shapes is allowed on request
    assert load_expert(p, decomp.factors, allow_other_model=True).name == "x"
    smaller = decompose_model(random_tiny_llama(seed=2, **dict(TINY, num_hidden_layers=2)),
                              cache_dir=False, progress=False)
    with pytest.raises(T2FileError, match=r"not adapted here"):
        load_expert(p, smaller.factors)
    assert Fingerprint.of(decomp.factors).mismatch(Fingerprint.of(other.factors))


# ---- banks and α -----------------------------------------------------------------------------
def _bank(decomp, experts, capacity=4):
    """A runtime over ``decomp``'s matrices (one group each) with ``experts`` loaded."""
    rt = SVFRuntime(3, capacity=capacity, device="cpu", bounds=MixtureBounds(), hybrid=False,
                    mix_in_kernel=True)
    for t, f in decomp.factors.items():
        rt.add_group([(t, f.rank)], 0)
    rt.load_experts(experts)
    return rt


def test_bank_rows_and_alpha(decomp):
    a = Expert.random("a", decomp.factors, seed=1)
    b = Expert.random("b", decomp.factors, seed=2)
    rt = _bank(decomp, [a, b])
    bank = rt.bank
    t = decomp.targets[0]
    assert torch.equal(bank.bank_z(t)[0], torch.ones(decomp.factors[t].rank))
    assert torch.equal(bank.bank_z(t)[2], b.z[t])
    assert not bank.bank_z(t)[3:].any(), "free rows are zero"
    assert rt.alpha_of(None)[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert rt.alpha_of("b")[0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert rt.alpha_of({"a": 0.3, "base": 0.7})[0].tolist() == pytest.approx([0.7, 0.3, 0, 0, 0])
    per_layer = rt.alpha_of(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    assert per_layer[:, 1:3].tolist() == [[1, 0], [0, 1], [0.5, 0.5]]
    assert torch.equal(bank.bank_z(t)[1], a.z[t])
    rt.unload_experts(["a"])                         # row 1 is free; "b" keeps row 2
    assert bank.names == ["b"] and bank.row_of == {"b": 2} and not bank.bank_z(t)[1].any()
    assert rt.alpha_of([1.0])[0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    rt.load_experts([Expert.random("c", decomp.factors, seed=3)])
    assert bank.row_of == {"b": 2, "c": 1} and bank.names == ["b", "c"]


@pytest.mark.parametrize("spec, pattern", [
    ("c", r"unknown expert 'c'; loaded experts: \['a', 'b'\]"),
    ({"a": float("nan")}, r"alpha\['a'\] must be finite"),
    ([1.0, 2.0, 3.0], r"alpha has 3 weights; expected 2"),
    ([float("inf"), 0.0], r"alpha\[0\] must be finite, got inf"),
    ([5.0, 0.0], r"alpha\['a'\] = 5 is outside the bound \|α\| ≤ 4"),
    ({}, r"all zero"),
    ({"zz": 1.0}, r"unknown expert 'zz'"),
])
def test_alpha_errors(decomp, spec, pattern):
    rt = _bank(decomp, [Expert.random("a", decomp.factors), Expert.random("b", decomp.factors)])
    with pytest.raises(ValueError, match=pattern):
        rt.alpha_of(spec)


def test_bank_rejects_duplicates_overflow_and_clashes(decomp):
    with pytest.raises(ValueError, match="unique"):
        _bank(decomp, [Expert.random("a", decomp.factors)] * 2)
    rt = _bank(decomp, [Expert.random("a", decomp.factors)], capacity=2)
    with pytest.raises(ValueError, match=r"already loaded.*replace=True"):
        rt.load_experts([Expert.random("a", decomp.factors, seed=5)])
    with pytest.raises(ValueError, match=r"holds 2 experts \(max_experts\); 1 are loaded and "
                                         r"2 more were given"):
        rt.load_experts([Expert.random(n, decomp.factors) for n in ("b", "c")])
    assert rt.expert_names == ["a"], "a refused load leaves the bank as it was"


def test_progress_bar_only_on_a_terminal(model, tmp_path, capfd, monkeypatch):
    decompose_model(model, "mlp", cache_dir=tmp_path, progress=True)    # stderr is not a TTY
    assert capfd.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for progress in (True, False):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        decompose_model(model, "mlp", cache_dir=tmp_path, progress=progress)
        assert ("SVD" in terminal.getvalue()) is progress
