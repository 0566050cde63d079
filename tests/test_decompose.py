"""Decomposition of weights: factors in the weights' dtype when asked."""
import torch


def test_factors_like_weights_are_cast_as_they_are_made():
    """``like_weights``: U and Vh in each weight's dtype (no float32 copy of every matrix at
    once), S float32, errors as measured in float32, and reconstruct still works."""
    from t2fast.decompose import decompose_weights
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(24, 16, generator=g).bfloat16(),
               "b": torch.randn(8, 20, generator=g)}
    plain = decompose_weights(weights, cache_dir=False, progress=False)
    cast = decompose_weights(weights, cache_dir=False, progress=False, like_weights=True)
    assert cast.errors == plain.errors
    for name, w in weights.items():
        f = cast.factors[name]
        assert (f.U.dtype, f.Vh.dtype, f.S.dtype) == (w.dtype, w.dtype, torch.float32)
        assert torch.equal(f.U, plain.factors[name].U.to(w.dtype))
        rel = (f.reconstruct() - w.float()).norm() / w.float().norm()
        assert f.reconstruct().dtype == torch.float32 and rel < 2e-2
    # the report says what the layers compute with: bf16 factors are off by ~1 bf16 ulp
    assert list(cast.held_errors) == ["a"] and plain.held_errors == {}
    rel = (cast.factors["a"].reconstruct() - weights["a"].float()).norm() / \
        weights["a"].float().norm()
    assert abs(cast.held_errors["a"] - float(rel)) < 1e-6 and 1e-3 < rel < 2e-2
    assert cast.report().endswith(f"; {cast.held_errors['a']:.2e} (a) with U and Vh as held "
                                  f"in bfloat16") and "held" not in plain.report()


def test_cache_works_under_a_bf16_default_dtype(tmp_path):
    """vLLM builds and loads a bf16 model with torch's default dtype set to bf16: the cache's
    probe check must not depend on it (it crashed ``t2fast serve`` on every bf16 checkpoint)."""
    from t2fast.decompose import SVDCache
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)).bfloat16()
    cache = SVDCache(tmp_path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        first, hit1 = cache.get_or_compute(w)
        again, hit2 = cache.get_or_compute(w)
    finally:
        torch.set_default_dtype(old)
    assert (hit1, hit2) == (False, True)
    assert first.U.dtype == again.U.dtype == torch.float32
    assert torch.equal(first.S, again.S)
    rel = (again.reconstruct() - w.float()).norm() / w.float().norm()
    assert rel < 1e-5


def test_default_cache_dir_follows_t2fast_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    from t2fast.decompose import default_cache_dir
    monkeypatch.delenv("T2FAST_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "t2fast" / "svd"
    monkeypatch.setenv("XDG_CACHE_HOME", "")                 # empty: unset (XDG spec)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "t2fast" / "svd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "t2fast" / "svd"
    monkeypatch.setenv("T2FAST_CACHE", str(tmp_path / "t2"))
    assert default_cache_dir() == tmp_path / "t2" / "svd"
