"""SVFHandle's API does not guess and fails safe: one spec or explicit rows, numpy weights,
an interrupted patch puts the model back, threads see whole mixtures, targets follow the
experts."""
import threading

import numpy as np
import pytest
import torch

import t2fast
from t2fast import patching as patch_module
from t2fast.experts import Expert
from t2fast.layers import SVFLinear
from t2fast.mixtures import MixtureError, MixtureTypeError
from t2fast.models import random_tiny_llama

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
IDS = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))


def _model():
    return random_tiny_llama(seed=0, **TINY).eval()


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(ids).logits


def _patched(svd_cache, **kw):
    model = _model()
    h = t2fast.patch_model(model, cache_dir=svd_cache, progress=False, backend="torch", **kw)
    f = h.decomposition.factors
    h.add_experts([h.new_expert(n, Expert.random(n, f, scale=0.6, seed=s).z)
                   for n, s in (("a", 1), ("b", 2))])
    return model, h


# ---- set_mixture: one spec, or rows= -----------------------------------------------------------
def test_nested_list_is_one_per_layer_spec_even_with_num_layers_rows(svd_cache):
    model, h = _patched(svd_cache, hybrid=False)
    assert h.num_layers == 2 == IDS.shape[0]         # the batch has num_layers rows
    h.set_mixture({"a": [1.0, 0.0], "b": [0.0, 1.0]})
    per_layer = _logits(model)
    h.set_mixture([[1.0, 0.0], [0.0, 1.0]])          # [num_layers][K]: the same per-layer α
    assert torch.equal(_logits(model), per_layer)
    h.set_mixture(rows=["a", "b"])                   # what a per-row reading would have given
    assert not torch.allclose(_logits(model), per_layer)


@pytest.mark.parametrize("weights", [
    [np.float32(0.25), np.float32(0.75)], np.array([0.25, 0.75], dtype=np.float32),
    [torch.tensor(0.25), torch.tensor(0.75)], [np.float64(0.25), np.int64(1) - 0.25],
], ids=["np.float32", "ndarray", "0-d tensors", "np.float64"])
def test_numpy_and_tensor_scalars_are_weights_like_floats(svd_cache, weights):
    model, h = _patched(svd_cache)
    assert h.set_mixture([0.25, 0.75]) == "merged"
    floats = _logits(model)
    assert h.set_mixture(weights) == "merged"
    assert torch.equal(_logits(model), floats)
    h.set_mixture(rows=[weights, "a"])
    h2 = _logits(model)
    h.set_mixture(rows=[[0.25, 0.75], "a"])
    assert torch.equal(_logits(model), h2)


def test_set_mixture_arguments_are_explicit(svd_cache):
    model, h = _patched(svd_cache)
    h.set_mixture(rows=["a", None])
    before = _logits(model)
    with pytest.raises(MixtureTypeError, match=r"alpha\[0\] must be a number, got 'a'.*pass "
                                               r"rows=\[\.\.\.\] for one mixture per batch row"):
        h.set_mixture(["a", "b"])
    with pytest.raises(TypeError, match="not both"):
        h.set_mixture("a", rows=["a", "b"])
    with pytest.raises(TypeError, match=r"rows=\.\.\.\) must be a list or tuple.*got str"):
        h.set_mixture(rows="ab")
    with pytest.raises(MixtureError, match=r"alpha\['a'\] must be finite, got an integer of "
                                           r"about 401 digits"):
        h.set_mixture(rows=[{"a": 10 ** 400}, "a"])
    assert torch.equal(_logits(model), before), "a failed call changed the mixture"


# ---- interrupted patching ----------------------------------------------------------------------
class Interrupt(BaseException):
    """Stands for KeyboardInterrupt without stopping pytest."""


def _fail_on_call(monkeypatch, owner, attr, n):
    """Make the n-th call of ``owner.attr`` raise Interrupt."""
    real, calls = getattr(owner, attr), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Interrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, wrapper)


@pytest.mark.parametrize("owner, attr, n", [
    (patch_module, "_parent", 5),                          # in the middle of the swaps
    (patch_module.SVFHandle, "_install_guards", 1),
    (patch_module, "SVFRuntime", 1),                       # after every module is swapped
    (patch_module.SVFRuntime, "add_group", 3),             # while the bank is laid out
    (patch_module.SVFRuntime, "load_experts", 1),          # while the experts go in
    (patch_module.SVFRuntime, "set_batch_mixture", 1),     # the very last step
], ids=["swapping", "guard", "runtime", "bank", "experts", "mixture"])
def test_interrupted_patch_model_restores_the_model(svd_cache, tmp_path, monkeypatch, owner, attr,
                                                    n):
    model = _model()
    expert = Expert.ones("e", t2fast.decompose_model(model, cache_dir=False,
                                                     progress=False).factors)
    path = expert.save(tmp_path / "e.safetensors")
    before, state = _logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as m:
        _fail_on_call(m, owner, attr, n)
        with pytest.raises(Interrupt):
            t2fast.patch_model(model, experts=[path], cache_dir=svd_cache, progress=False)
    assert not any(isinstance(mod, SVFLinear) for mod in model.modules())
    assert not {"forward", "_apply", "__deepcopy__", "__reduce_ex__", "load_state_dict"} & \
        set(model.__dict__)
    assert torch.equal(_logits(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    t2fast.patch_model(model, experts=[path], cache_dir=svd_cache, progress=False).restore()
    assert torch.equal(_logits(model), before)


# ---- threads -----------------------------------------------------------------------------------
def _references(model, h, mixtures):
    out = []
    for spec in mixtures:
        h.set_mixture(rows=spec)
        out.append(_logits(model))
    return out


def _is_one_of(x, refs):
    return any(torch.equal(x, r) for r in refs)


def test_concurrent_set_mixture_leaves_one_of_the_mixtures(svd_cache):
    model, h = _patched(svd_cache)
    mixtures = [["a", {"a": 0.5, "b": 0.5}], [{"b": 0.2}, "b"]]
    refs = _references(model, h, mixtures)
    for trial in range(30):
        start = threading.Barrier(2)

        def setter(spec):
            start.wait()
            for _ in range(3):
                h.set_mixture(rows=spec)
        threads = [threading.Thread(target=setter, args=(m,)) for m in mixtures]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _is_one_of(_logits(model), refs), f"trial {trial}: a mixture equal to neither"


def test_forward_during_set_mixture_sees_one_mixture(svd_cache):
    model, h = _patched(svd_cache)
    mixtures = [["a", {"a": 0.5, "b": 0.5}], [{"b": 0.2}, "b"]]
    refs = _references(model, h, mixtures)
    stop, outs = threading.Event(), []

    def forward():
        while not stop.is_set():
            outs.append(_logits(model))
    reader = threading.Thread(target=forward)
    reader.start()
    try:
        for k in range(60):
            h.set_mixture(rows=mixtures[k % 2])
    finally:
        stop.set()
        reader.join()
    mixed = sum(not _is_one_of(o, refs) for o in outs)
    assert outs and not mixed, f"{mixed} of {len(outs)} forward passes mixed two mixtures"


def test_lock_is_reentrant_and_released_after_an_error(svd_cache):
    model, h = _patched(svd_cache)
    with h.lock:
        h.set_mixture("a")
        first = _logits(model)
    with pytest.raises(IndexError, match="index out of range"):
        model(torch.full((2, 5), 10 ** 6))                # an index error inside the forward
    done = []
    t = threading.Thread(target=lambda: done.append(_logits(model)))
    t.start()
    t.join(timeout=60)
    assert done and torch.equal(done[0], first), "the forward's lock was not released"
    h.restore()
    assert "forward" not in model.__dict__


# ---- targets from the experts ------------------------------------------------------------------
def _mlp_expert(tmp_path, svd_cache, name="m", targets="mlp"):
    model = _model()
    h = t2fast.patch_model(model, targets=targets, cache_dir=svd_cache, progress=False)
    e = h.new_expert(name, Expert.random(name, h.decomposition.factors, 0.3, seed=5).z)
    h.restore()
    return e, e.save(tmp_path / f"{name}.safetensors")


def test_targets_come_from_the_experts_when_none_are_given(tmp_path, svd_cache):
    e, path = _mlp_expert(tmp_path, svd_cache)
    model = _model()
    for experts in ([path], [e], path):
        h = t2fast.patch_model(model, experts=experts, cache_dir=svd_cache, progress=False)
        assert h.targets == e.targets and all(".mlp." in n for n in h.targets)
        h.restore()
    h = t2fast.patch_model(model, experts=[path], targets="mlp", cache_dir=svd_cache,
                           progress=False)
    assert h.targets == e.targets
    h.restore()
    with pytest.raises(t2fast.T2FileError, match=r"does not cover the adapted matrices: "
                                                  r"missing 8"):
        t2fast.patch_model(model, experts=[path], targets="all", cache_dir=svd_cache,
                           progress=False)
    assert not any(isinstance(mod, SVFLinear) for mod in model.modules())


def test_experts_with_different_targets_are_an_error(tmp_path, svd_cache):
    _, mlp = _mlp_expert(tmp_path, svd_cache)
    _, down = _mlp_expert(tmp_path, svd_cache, "d", targets="down_proj")
    model = _model()
    with pytest.raises(ValueError, match=r"the experts adapt different matrices \(expert "
                                         r"'.*m\.safetensors': 6, expert '.*d\.safetensors': 2.*"
                                         r"pass targets="):
        t2fast.patch_model(model, experts=[mlp, down], cache_dir=svd_cache, progress=False)
    other = random_tiny_llama(seed=0, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2).eval()
    with pytest.raises(ValueError, match=r"adapts 6 matrices, 3 of which are not linear modules "
                                         r"of this model"):
        t2fast.patch_model(other, experts=[mlp], cache_dir=svd_cache, progress=False)
    assert not any(isinstance(mod, SVFLinear) for mod in model.modules())


# ---- after patching: no cast, move, copy or weight load goes silently wrong ---------------------
def test_a_cast_or_move_after_patching_is_refused_before_anything_changes(svd_cache):
    """The expert tables, merged weights and original weights are placed at patch time: a cast
    left mixtures crashing (bf16 factors beside float32 weights) and restore() a mixed model."""
    model, h = _patched(svd_cache)
    h.set_mixture("a")
    want = _logits(model)
    before = {k: v.dtype for k, v in model.state_dict().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("meta"),
                 lambda m: m.to(device="meta", dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"this model was patched on cpu in torch\.float32"
                                               r"; moving or casting it .*Move or cast the "
                                               r"model before patch_model"):
            cast(model)
        assert {k: v.dtype for k, v in model.state_dict().items()} == before
        assert torch.equal(_logits(model), want)
    assert model.to(torch.float32) is model and model.float() is model    # no change: allowed
    with pytest.raises(RuntimeError, match="this model was patched on cpu"):
        model.model.layers[0].half()                   # a submodule's cast: each layer checks
    original = h.restore()
    assert original.to(torch.bfloat16).model.layers[0].self_attn.q_proj.weight.dtype == \
        torch.bfloat16                                  # restored: the guard is gone


def test_a_patched_model_is_not_copied_pickled_or_loaded_into(svd_cache, tmp_path):
    """A deep copy ran the original model's forward (and followed its handle); pickling failed
    with a misleading message; load_state_dict(strict=False) dropped the adapted weights."""
    import copy
    import pickle

    model, h = _patched(svd_cache)
    for copier in (copy.deepcopy, pickle.dumps, lambda m: torch.save(m, tmp_path / "m.pt")):
        with pytest.raises(TypeError, match="a patched model cannot be copied or pickled"):
            copier(model)
    h.merge("a")
    state = model.state_dict()
    state["model.embed_tokens.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    want = _logits(model)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj is an SVF "
                                               r"layer: a weight loaded into a patched model"):
            model.load_state_dict(state, strict=strict)
        assert torch.equal(_logits(model), want)        # refused before anything loaded
    h.restore()
    assert copy.deepcopy(model) is not model


def test_saving_after_keep_dense_false_names_the_dropped_weight(svd_cache):
    model, h = _patched(svd_cache, keep_dense=False)
    h.set_mixture(None)
    with pytest.raises(RuntimeError, match=r"whose original weight was dropped \(keep_dense="
                                           r"False\); handle\.restore\(\) rebuilds it"):
        model.state_dict()
