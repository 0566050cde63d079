"""The SVF runtime (t2fast/runtime.py): slots, modes, the merge cache's byte budget, the bank's
capacity, and the Hugging Face handle over it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import t2fast
from t2fast.experts import Expert
from t2fast.mixtures import MixtureBounds
from t2fast.models import random_tiny_llama
from t2fast.runtime import MODES, STATS, SVFRuntime

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)


def _runtime(hybrid=True, mix_in_kernel=False, budget=None, capacity=3, max_slots=None):
    rt = SVFRuntime(2, capacity=capacity, device="cpu", bounds=MixtureBounds(), hybrid=hybrid,
                    mix_in_kernel=mix_in_kernel, merge_cache_bytes=budget, max_slots=max_slots)
    rt.add_group([("l0.q", 4), ("l0.k", 2)], 0)
    rt.add_group([("l1.o", 3)], 1)
    g = torch.Generator().manual_seed(0)
    experts = [Expert(n, {t: 1 + torch.randn(r, generator=g) for t, r in
                          (("l0.q", 4), ("l0.k", 2), ("l1.o", 3))}) for n in ("a", "b")]
    rt.load_experts(experts)
    rt.merged_bytes = 100
    return rt, experts


def test_slots_are_deduplicated_and_the_slot_z_table_is_alpha_at_bank():
    rt, (a, b) = _runtime(hybrid=False)
    mode = rt.set_row_mixtures([rt.alpha_of("a"), None, rt.alpha_of({"a": 0.5, "b": 0.5}),
                                rt.alpha_of("a")])
    assert mode == "factored" and rt.num_rows == 4
    assert rt.slot_map[:4].tolist() == [1, 0, 2, 1]
    q = rt.group_slot_z(0)[:, :4]                       # l0.q's columns of the group table
    torch.testing.assert_close(q[0], torch.ones(4))
    torch.testing.assert_close(q[1], a.z["l0.q"])
    torch.testing.assert_close(q[2], 0.5 * (a.z["l0.q"] + b.z["l0.q"]))
    assert rt.token_slots(torch.Size([4, 3])).tolist() == [1] * 3 + [0] * 3 + [2] * 3 + [1] * 3
    with pytest.raises(ValueError, match="set for 4 batch rows"):
        rt.token_slots(torch.Size([3, 1]))


def test_modes_and_statistics():
    rt, _ = _runtime()
    assert set(rt.stats) == set(STATS) and set(MODES) <= set(STATS)
    assert rt.set_batch_mixture(rt.alpha_of(None)) == "base"
    assert rt.set_batch_mixture(rt.alpha_of("a")) == "merged"
    assert rt.set_row_mixtures([rt.alpha_of("b")] * 3) == "merged"      # one mixture, per row
    assert rt.set_row_mixtures([rt.alpha_of("b"), None]) == "factored"
    assert rt.set_batch_mixture(rt.alpha_of("a"), dense=False) == "factored"
    assert rt.set_row_mixtures([], repeat=[]) == "base"                 # an empty step
    assert rt.stats["merges"] == 2 and rt.stats["merge_cache_hits"] == 0
    assert rt.set_batch_mixture(rt.alpha_of("a")) == "merged"
    assert rt.stats["merge_cache_hits"] == 1


def test_merge_cache_keeps_what_fits_the_budget_least_recently_used_out():
    rt, _ = _runtime(budget=250)                    # 100 bytes per mixture: two fit
    built = []

    def merged(spec):
        rt.set_batch_mixture(rt.alpha_of(spec))
        return rt.merged("u", lambda z_of: built.append(spec) or torch.zeros(25))

    merged("a"), merged("b"), merged("a")          # "a" is now the most recent
    merged({"a": 0.5, "b": 0.5})                   # evicts "b"
    assert built == ["a", "b", {"a": 0.5, "b": 0.5}]
    assert rt.stats["merge_evictions"] == 1 and len(rt.merge_cache.entries) == 2
    merged("a")
    assert len(built) == 3 and rt.stats["merge_cache_hits"] == 2     # "a" was kept
    merged("b")
    assert built[-1] == "b"
    report = rt.memory_report()
    assert report["merge_budget"] == 250 and report["merged"] == 200


def test_over_budget_serves_factored_or_refuses_an_explicit_merge():
    rt, _ = _runtime(budget=50)
    assert rt.set_batch_mixture(rt.alpha_of("a")) == "factored"
    assert rt.stats["merge_over_budget"] == 1
    with pytest.raises(ValueError, match=r"need 100 bytes, more than the merge cache's budget "
                                         r"of 50 bytes \(merge_cache_bytes\)"):
        rt.set_batch_mixture(rt.alpha_of("b"), dense=True)
    assert rt.mode == "factored", "a refused merge changes nothing"


def test_default_budget_is_half_the_free_memory():
    rt, _ = _runtime()
    assert rt.merge_cache.budget is None
    rt.set_batch_mixture(rt.alpha_of("a"))
    assert 0 < rt.merge_cache.budget


def test_fixed_tables_refuse_overflow_and_grown_tables_keep_their_values():
    rt, _ = _runtime(max_slots=2)
    with pytest.raises(RuntimeError, match="2 distinct mixtures in one step, more than the 1"):
        rt.set_row_mixtures([rt.alpha_of("a"), rt.alpha_of("b")])
    rt, _ = _runtime(hybrid=False)
    specs = ["a", "b", {"a": 0.2, "b": 0.8}, {"a": 0.7}, {"b": 0.1}]
    rt.set_row_mixtures([rt.alpha_of(s) for s in specs])
    assert rt.alpha.shape[1] >= 6 and rt.slot_map[:5].tolist() == [1, 2, 3, 4, 5]
    torch.testing.assert_close(rt.alpha[:, 5], rt.alpha_of({"b": 0.1}))


def test_handle_bank_capacity_remove_and_memory_report(tmp_path):
    model = random_tiny_llama(seed=0, **TINY).eval()
    h = t2fast.patch_model(model, cache_dir=tmp_path, progress=False, max_experts=2,
                           merge_cache_bytes=10 ** 9)
    f = h.decomposition.factors
    h.add_experts([Expert.random(n, f, seed=i) for i, n in enumerate("ab")])
    with pytest.raises(ValueError, match=r"holds 2 experts \(max_experts\)"):
        h.add_experts([Expert.random("c", f)])
    ids = torch.randint(3, 60, (2, 5))
    h.set_mixture("b")
    with torch.no_grad():
        before = model(ids).logits
    h.remove_experts("a")
    assert h.expert_names == ["b"] and h.bank.row_of == {"b": 2}
    h.add_experts([Expert.random("c", f, seed=7)])                  # takes the free row 1
    assert h.bank.row_of == {"b": 2, "c": 1}
    assert h.set_mixture("b") == "merged"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    rep = h.memory_report()
    one = sum(l.out_features * l.in_features * 4 for l in h.modules.values())
    assert rep["runtime"]["merged"] == rep["total"]["merged"] == one
    assert rep["runtime"]["merged_per_mixture"] == one
    assert rep["runtime"]["merge_budget"] == 10 ** 9


def test_merge_z_serves_explicit_vectors(tmp_path):
    model = random_tiny_llama(seed=0, **TINY).eval()
    h = t2fast.patch_model(model, cache_dir=tmp_path, progress=False)
    e = Expert.random("a", h.decomposition.factors, seed=3)
    ids = torch.randint(3, 60, (2, 5))
    h.merge_z(e.z)
    with torch.no_grad():
        explicit = model(ids).logits
    h.add_experts([e])
    h.merge("a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, explicit, rtol=0, atol=0)
    with pytest.raises(ValueError, match="merge_z: no z given"):
        h.merge_z({})
    for seed in range(3):                    # a policy's z changes every step: one entry kept
        h.merge_z(Expert.random("p", h.decomposition.factors, seed=10 + seed).z)
    keys = list(h.runtime.merge_cache.entries)
    assert sum(k.startswith(b"weights:") for k in keys) == 1 and len(keys) == 2


def test_tables_are_float32_under_a_bf16_default_dtype():
    """vLLM loads a bf16 checkpoint with torch's default dtype set to bf16; the runtime's host
    and device tables must stay float32 (this crashed every bf16 engine at start-up)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        rt, _ = _runtime(hybrid=False)
        assert rt.set_row_mixtures([rt.alpha_of("a"), None]) == "factored"
        tables = [rt.alpha, *rt.slot_z, *rt.bank.tables, rt.base_alpha(), rt.alpha_of("b")]
        assert {t.dtype for t in tables} == {torch.float32}
    finally:
        torch.set_default_dtype(torch.float32)


def test_tables_mirrored_on_other_devices_follow_every_write():
    """A model split over devices reads the α table and slot map on each layer's device: the
    mirror is persistent and follows writes and growth (here the meta device stands for a
    second accelerator)."""
    rt, _ = _runtime(hybrid=False)
    meta = torch.device("meta")
    rt.reserve(2)
    alpha, slots = rt.on("alpha", meta), rt.on("slot_map", meta)
    assert alpha.device == meta and alpha.shape == rt.alpha.shape
    assert rt.on("alpha", meta) is alpha and rt.on("alpha", rt.device) is rt.alpha
    class Writes(TorchDispatchMode):                  # the meta mirror holds no values: watch
        def __init__(self):                           # the copies into it instead
            super().__init__()
            self.into = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.copy_:
                self.into.append(args[0])
            return func(*args, **(kwargs or {}))

    with Writes() as writes:
        rt.set_row_mixtures([rt.alpha_of("a"), None])
    assert rt.on("alpha", meta) is alpha and rt.on("slot_map", meta) is slots, "kept in place"
    assert any(t is alpha for t in writes.into) and any(t is slots for t in writes.into), \
        "every write reaches the mirrors"
    rt.set_row_mixtures([rt.alpha_of(s) for s in ("a", "b", {"a": 0.5}, {"b": 0.5})] * 3)
    assert rt.on("alpha", meta).shape == rt.alpha.shape, "grown with the table"
    assert rt.on("slot_map", meta).shape == rt.slot_map.shape
    assert rt.token_slots(torch.Size([12]), meta).device == meta
