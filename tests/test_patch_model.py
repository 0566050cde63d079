"""t2fast.patch_model on a tiny random Llama: per-row experts, merging, restoring."""
import pytest
import torch

import t2fast
from t2fast.experts import Expert
from t2fast.layers import SVFLinear
from t2fast.models import random_tiny_llama

TINY = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _model(dtype=torch.float32, seed=0):
    return random_tiny_llama(seed=seed, **TINY).to(dtype).eval()


def _ids(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (batch, length), generator=g)


def _experts(handle):
    f = handle.decomposition.factors
    a = handle.new_expert("a", Expert.random("a", f, scale=0.6, seed=1).z)
    b = handle.new_expert("b", Expert.random("b", f, scale=0.6, seed=2).z)
    return [a, b]


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.03)],
                         ids=["fp32", "bf16"])
def test_identity_z_matches_unpatched(dtype, tol, svd_cache):
    model = _model(dtype)
    ids = _ids()
    ref = _logits(model, ids)
    h = t2fast.patch_model(model, cache_dir=svd_cache, hybrid=False, progress=False)
    assert all(isinstance(model.get_submodule(n), SVFLinear) for n in h.targets)
    assert len(h.targets) == 14
    out = _logits(model, ids)
    assert (out - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("mix_in_kernel", [False, True], ids=["z-table", "alpha-in-kernel"])
def test_per_row_generate_equals_each_row_alone(mix_in_kernel, svd_cache):
    model = _model()
    ids = _ids(batch=4)
    h = t2fast.patch_model(model, cache_dir=svd_cache, mix_in_kernel=mix_in_kernel,
                           progress=False)
    h.add_experts(_experts(h))
    rows = ["a", None, {"a": 0.5, "b": 0.5}, torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    assert h.set_mixture(rows=rows) == "factored"
    with torch.no_grad():
        batch = model.generate(ids, **GEN)
    outs = set()
    for i, spec in enumerate(rows):
        h.merge(spec)
        with torch.no_grad():
            alone = model.generate(ids[i:i + 1], **GEN)
        assert batch[i].tolist() == alone[0].tolist(), f"row {i} ({spec!r}) differs"
        outs.add(tuple(alone[0, ids.shape[1]:].tolist()))
    assert len(outs) > 1, "experts should change the generations"
    assert h.stats["factored"] >= 1 and h.stats["merges"] == 3


def test_same_prompt_different_experts_differ_and_base_row_is_base(svd_cache):
    model = _model()
    ids = _ids(batch=1).repeat(3, 1)
    base = _logits(model, ids[:1])
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    h.add_experts(_experts(h))
    h.set_mixture(rows=[None, "a", "b"])
    out = _logits(model, ids)
    assert (out[0] - base[0]).abs().max() < 1e-4
    assert (out[1] - out[0]).abs().max() > 1e-2 and (out[2] - out[1]).abs().max() > 1e-2


def test_merge_matches_factored_and_hybrid_paths(svd_cache):
    model = _model()
    ids = _ids()
    ref = _logits(model, ids)
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    h.add_experts(_experts(h))
    assert h.set_mixture(None) == "base"
    assert torch.equal(_logits(model, ids), ref), "hybrid base path must use the exact weights"
    h.merge({"a": 0.3, "b": 0.7})
    merged = _logits(model, ids)
    h.unmerge()
    h.set_mixture(rows=[{"a": 0.3, "b": 0.7}, {"a": 0.3, "b": 0.7}, None])
    assert h.stats["base"] >= 1
    factored = _logits(model, ids)
    torch.testing.assert_close(factored[:2], merged[:2], rtol=1e-4, atol=1e-4)
    # a single mixture for the whole batch goes through the cached merge
    assert h.set_mixture({"a": 0.3, "b": 0.7}) == "merged"
    assert h.stats["merge_cache_hits"] == 1
    torch.testing.assert_close(_logits(model, ids), merged, rtol=0, atol=0)


def test_restore_is_bit_exact(svd_cache):
    model = _model(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules()}
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    h.add_experts(_experts(h))
    h.set_mixture(rows=["a", "b", None])
    _logits(model, _ids())
    h.restore()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(model.get_submodule(n) is originals[n] for n in h.targets)
    with pytest.raises(RuntimeError, match="restored"):
        h.set_mixture(None)
    t2fast.patch_model(model, cache_dir=svd_cache, progress=False)   # patchable again


def test_targets_subset_and_layers(svd_cache):
    model = _model()
    h = t2fast.patch_model(model, targets="mlp", layers=[1], cache_dir=svd_cache,
                           progress=False)
    assert h.targets == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert not isinstance(model.model.layers[0].mlp.down_proj, SVFLinear)
    e = h.new_expert("m")
    assert e.targets == h.targets


def test_trainable_z_gets_gradients(svd_cache):
    model = _model()
    ids = _ids()
    ref = _logits(model, ids)
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    z = {n: torch.nn.Parameter(torch.ones(l.rank)) for n, l in h.modules.items()}
    h.set_trainable_z(z)
    out = model(ids).logits
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in z.values())
    with pytest.raises(ValueError, match=r"expected \(\d+,\)"):
        h.set_trainable_z({n: torch.nn.Parameter(torch.ones(2)) for n in h.modules})
    h.set_trainable_z(None)


def test_handle_errors(svd_cache, tmp_path):
    model = _model()
    h = t2fast.patch_model(model, cache_dir=svd_cache, hybrid=False, progress=False)
    h.add_experts(_experts(h))
    with pytest.raises(ValueError, match="unknown expert 'c'"):
        h.set_mixture(rows=["a", "c"])
    with pytest.raises(ValueError, match=r"alpha has 3 weights; expected 2"):
        h.set_mixture(rows=[[0.1, 0.2, 0.3]])
    h.set_mixture(rows=["a", "b"])
    with pytest.raises(ValueError, match=r"mixture was set for 2 batch rows.*\(3, 7\)"):
        _logits(model, _ids(batch=3))
    with pytest.raises(ValueError, match="already patched"):
        t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    with pytest.raises(ValueError, match=r"\['a'\] are already loaded.*replace=True"):
        h.add_experts(_experts(h)[:1])
    other = t2fast.decompose_model(_model(seed=5), cache_dir=False, progress=False)
    foreign = Expert.random("f", other.factors).save(tmp_path / "f.safetensors")
    with pytest.raises(t2fast.T2FileError, match="another base model"):
        h.add_experts([foreign])
    h.add_experts([foreign], allow_other_model=True)
    assert h.expert_names == ["a", "b", "f"]
    # a handle patched to accept other models' experts accepts them in later calls too
    h.restore()
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False, allow_other_model=True)
    h.add_experts([foreign])
    with pytest.raises(t2fast.T2FileError, match="another base model"):
        h.add_experts([foreign], allow_other_model=False, replace=True)
    assert h.expert_names == ["f"]


def test_add_experts_replace_keeps_bank_order(svd_cache):
    model = _model()
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    a, b = _experts(h)
    h.add_experts([a, b])
    h.set_mixture("a")
    before = _logits(model, _ids())
    a2 = h.new_expert("a", Expert.random("a", h.decomposition.factors, scale=0.6, seed=9).z)
    with pytest.raises(ValueError, match="more than once"):
        h.add_experts([a2, a2], replace=True)
    h.add_experts([a2], replace=True)
    assert h.expert_names == ["a", "b"]
    h.set_mixture("a")
    assert (_logits(model, _ids()) - before).abs().max() > 1e-3


def test_new_expert_is_not_added_to_the_bank(svd_cache):
    h = t2fast.patch_model(_model(), cache_dir=svd_cache, progress=False)
    e = h.new_expert("m")
    assert h.expert_names == [] and e.fingerprint == h.fingerprint
    with pytest.raises(ValueError, match="not adapted here"):
        h.new_expert("m", {"model.embed_tokens": torch.ones(3)})
    h.add_experts([e])
    assert h.expert_names == ["m"]


def test_row_count_is_checked_on_the_merged_path(svd_cache):
    model = _model()
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False)
    h.add_experts(_experts(h))
    assert h.set_mixture(rows=["a"] * 3) == "merged"
    with pytest.raises(ValueError, match=r"set for 3 batch rows.*\(5, 7\)"):
        _logits(model, _ids(batch=5))
    assert h.set_mixture(rows=[None] * 2) == "base"
    with pytest.raises(ValueError, match="set for 2 batch rows"):
        _logits(model, _ids(batch=3))
    h.set_mixture("a")                      # one spec: any batch size
    _logits(model, _ids(batch=5))


def test_save_pretrained_writes_merged_weights_or_refuses(svd_cache, tmp_path):
    from safetensors.torch import load_file

    model = _model()
    ids = _ids()
    keys = set(model.state_dict())
    h = t2fast.patch_model(model, cache_dir=svd_cache, hybrid=False, progress=False)
    h.add_experts(_experts(h))
    h.set_mixture(rows=["a", "b", None])
    with pytest.raises(RuntimeError, match=r"per-row mixtures.*merge\(spec\).*restore\(\)"):
        model.save_pretrained(tmp_path / "partial")
    assert not (tmp_path / "partial" / "model.safetensors").exists()
    h.merge("a")
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert keys <= set(saved) | {"lm_head.weight"}
    h.restore()
    model.load_state_dict(saved, strict=False)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_import_forms():
    import importlib.util

    from t2fast import patch_model
    from t2fast.patching import SVFHandle, patch_model as function
    assert t2fast.patch_model is patch_model is function, "t2fast.patch_model: one thing"
    assert importlib.util.find_spec("t2fast.patch_model") is None, "no module of that name"
    assert t2fast.SVFHandle is SVFHandle


def test_mixture_bounds_are_configurable(svd_cache):
    from t2fast.mixtures import MixtureBounds
    h = t2fast.patch_model(_model(), cache_dir=svd_cache, progress=False,
                           mixture_bounds=MixtureBounds(max_abs=16, max_l1=16))
    h.add_experts(_experts(h))
    assert h.set_mixture({"a": 10.0}) == "merged"
    with pytest.raises(ValueError, match=r"Σ\|α\| = 20 is outside the bound Σ\|α\| ≤ 16"):
        h.set_mixture({"a": 10.0, "b": -10.0})
    h.mixture_bounds = MixtureBounds()
    with pytest.raises(ValueError, match=r"alpha\['a'\] = 10 is outside the bound \|α\| ≤ 4"):
        h.set_mixture({"a": 10.0})


def test_deprecated_aliases_are_gone_and_layers_read_the_runtime_bank(svd_cache):
    h = t2fast.patch_model(_model(), cache_dir=svd_cache, progress=False)
    assert not hasattr(h, "layers") and not hasattr(h.bank, "bank")
    name = h.targets[0]
    assert h.modules[name].bank_z.data_ptr() == h.bank.bank_z(name).data_ptr()
    assert h.modules[name].runtime is h.runtime
