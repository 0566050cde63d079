"""A patched model's step can be captured once and replayed with any mixtures (CUDA graphs on a
GPU; here ``torch.compile`` on the CPU), and ``keep_dense=False`` serves the base from the factors.

Per-row slot indices and z tables live in persistent buffers that ``set_mixture`` overwrites in
place: the compiled step is not recompiled and the buffers keep their storage, so a CUDA graph
captured over them reads each new assignment of mixtures to rows.
"""
import pytest
import torch

import t2fast
from t2fast.experts import Expert
from t2fast.models import random_tiny_llama

TINY = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _patched(svd_cache, **kw):
    model = random_tiny_llama(seed=0, **TINY).eval()
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False, backend="torch", **kw)
    f = h.decomposition.factors
    h.add_experts([h.new_expert(n, Expert.random(n, f, scale=0.6, seed=s).z)
                   for n, s in (("a", 1), ("b", 2))])
    return model, h


def _ids(batch, length=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (batch, length), generator=g)


def _buffers(h):
    rt = h.runtime
    return [t.data_ptr() for t in (rt.alpha, rt.slot_map, *rt.slot_z, *rt.bank.tables)]


@pytest.mark.parametrize("length", [1, 5], ids=["decode", "prefill"])
def test_compiled_step_follows_set_mixture(length, svd_cache):
    model, h = _patched(svd_cache)
    ids = _ids(4, length)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x: model(x).logits, backend=backend)
    first = ["a", "b", None, {"a": 0.5, "b": 0.5}]
    second = ["b", "b", None, "a"]                   # rows 0 and 3 change, rows 1 and 2 do not
    with torch.no_grad():
        h.set_mixture(rows=first)
        y1 = step(ids).clone()
        rows_ptr = h.runtime.slot_map.data_ptr()
        tables = _buffers(h)
        n_compiles = len(compiles)
        h.set_mixture(rows=second)
        y2 = step(ids).clone()
        assert len(compiles) == n_compiles, "changing the mixture recompiled the step"
        assert h.runtime.slot_map.data_ptr() == rows_ptr
        assert _buffers(h) == tables, "set_mixture reallocated a slot table"
        for r in (0, 3):
            assert not torch.allclose(y1[r], y2[r]), f"row {r} did not follow its new mixture"
        for r in (1, 2):
            torch.testing.assert_close(y1[r], y2[r], rtol=0, atol=1e-6)
        # the replayed step equals an eager forward with that mixture
        torch.testing.assert_close(y2, model(ids).logits, rtol=1e-5, atol=1e-5)
        h.set_mixture(rows=first)
        torch.testing.assert_close(step(ids), y1, rtol=1e-5, atol=1e-5)


def test_larger_batch_grows_buffers_then_stays(svd_cache):
    model, h = _patched(svd_cache)
    h.set_mixture(rows=["a", "b"])
    model(_ids(2))
    h.set_mixture(rows=["a", "b", None, "b", "a"])          # more rows: one reallocation
    model(_ids(5))
    ptr = h.runtime.slot_map.data_ptr()
    tables = _buffers(h)
    for rows in (["b"] * 5, ["a", None, "a", None, "b"], ["a", "b"]):
        h.set_mixture(rows=rows)
        model(_ids(len(rows)))
        assert h.runtime.slot_map.data_ptr() == ptr
        assert _buffers(h) == tables


def test_keep_dense_false_serves_base_from_factors(svd_cache):
    ref_model = random_tiny_llama(seed=0, **TINY).eval()
    ids = _ids(3, 6)
    with torch.no_grad():
        ref = ref_model(ids).logits
        model, h = _patched(svd_cache, keep_dense=False)
        rep = h.memory_report()
        assert rep["keep_dense"] is False and rep["total"]["dense"] == 0
        assert h.set_mixture(None) == "base"
        assert all(l.dense_weight() is None for l in h.modules.values())    # factored, z = 1
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        h.set_mixture(rows=["a", None, "b"])
        mixed = model(ids).logits
        torch.testing.assert_close(mixed[1], ref[1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(mixed[0], ref[0], atol=1e-3)
        h.restore()                                  # rebuilt from U diag(σ) Vh
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_memory_report_counts_every_role(svd_cache):
    model, h = _patched(svd_cache)
    rep = h.memory_report()
    name = "model.layers.0.mlp.down_proj"          # 48 x 72: r = 48
    m = rep["per_matrix"][name]
    assert m["dense"] == 48 * 72 * 4
    assert (m["U"], m["S"], m["Vh"]) == (48 * 48 * 4, 48 * 4, 48 * 72 * 4)
    assert m["merged"] == 0
    h.merge("a")
    assert h.memory_report()["per_matrix"][name]["merged"] == 48 * 72 * 4
    total = h.memory_report()["total"]
    assert total["all"] == sum(v for k, v in total.items() if k != "all")
    # the decomposition shares the layers' factors: one copy of U and Vh
    f = h.decomposition.factors[name]
    assert f.U.data_ptr() == h.modules[name].U.data_ptr()


@pytest.mark.parametrize("single", ["a", None], ids=["merged", "base"])
def test_captured_step_takes_the_factored_path(monkeypatch, svd_cache, single):
    """With ``hybrid``, a single-mixture batch runs dense weights in eager calls; a CUDA graph
    must capture the factored path instead (here capture is simulated), since it follows later
    mixtures, per-row ones included. Dense weights poisoned during the "capture" show the
    factored path is taken and set for the single mixture."""
    from t2fast import layers
    model, h = _patched(svd_cache)
    ids = _ids(3)
    with torch.no_grad():
        assert h.set_mixture(single) == ("merged" if single else "base")
        eager = model(ids).logits
        monkeypatch.setattr(layers, "capturing", lambda: True)
        for layer in h.modules.values():                 # poison the dense weights
            w = layer.dense_weight()
            w.copy_(torch.full_like(w, float("nan")))
        torch.testing.assert_close(model(ids).logits, eager, rtol=1e-4, atol=1e-4)
        rows = ["b", single, "a"]
        h.set_mixture(rows=rows)
        captured = model(ids).logits
        monkeypatch.setattr(layers, "capturing", lambda: False)
        # each row is its own mixture's answer: on a fresh copy, that mixture alone on merged
        # dense weights (the base weights for None)
        fresh, h2 = _patched(svd_cache)
        for i, spec in enumerate(rows):
            assert h2.set_mixture(spec) == ("merged" if spec else "base")
            torch.testing.assert_close(captured[i:i + 1], fresh(ids[i:i + 1]).logits,
                                       rtol=1e-4, atol=1e-4)
