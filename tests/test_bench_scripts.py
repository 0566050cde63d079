"""The decode-step benchmark runs end to end on the CPU (``--small``: eager steps, tiny dims):
every variant is timed on a live model, the per-row step follows ``set_mixture``, and the results
carry the shapes and the byte limit. CPU times say nothing about GPU speed; this only keeps the
script working."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_decode_step_small_runs_every_variant(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "decode_step.py"), "--small", "--batch", "2",
         "--steps", "1", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = tmp_path.glob("decode-cpu-*-small.json")
    result = json.loads(path.read_text())
    (run,) = result["runs"]
    assert (result["layers"], result["vocab"], result["tied_layers"]) == (1, 256, True)
    assert set(run["step_us"]) == {"unpatched", "per_row", "merged"}
    assert set(run["ratio_to_unpatched"]) == set(run["byte_limit"]) == {"per_row", "merged"}
    assert 0 < run["byte_limit"]["per_row"] < 1 and run["byte_limit"]["merged"] == 1
    assert run["per_row_graph_follows_set_mixture"] is True and not run["capture_errors"]
    assert all(v > 0 for v in run["step_us"].values())


def test_byte_limit_of_llama3_8b_at_batch_1():
    """The limit of exact per-row mixing on the full model: 0.733x unpatched at batch 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from decode_step import byte_limit
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert abs(byte_limit("llama3-8b", 32, 128256, 1, 512)["per_row"] - 0.7326) < 1e-3


def test_decode_step_frees_each_batch_patched_model(monkeypatch):
    """A patched model sits in reference cycles: run_batch collects it before returning, or on
    the GPU each batch would keep a patched copy of the 8B model (and its merged weights)."""
    import functools
    import gc
    import tempfile

    import t2fast
    # the torch backend: a quick check (the interpreted kernels take minutes)
    monkeypatch.setattr(t2fast, "patch_model", functools.partial(t2fast.patch_model,
                                                                 backend="torch"))
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import decode_step
        from t2fast.layers import SVFLinear

        def alive() -> int:
            return sum(isinstance(o, SVFLinear) for o in gc.get_objects())
        lm = decode_step.build_model("cpu-small", 1, decode_step.torch.float32, 256)
        gc.collect()
        before = alive()                # other tests' patched models may live on
        gc.disable()                    # only run_batch's own collection may free the copy
        try:
            with tempfile.TemporaryDirectory() as cache:
                decode_step.run_batch(lm, "cpu-small", 1, 8, 1, 1, cache, {})
            assert alive() == before
        finally:
            gc.enable()
    finally:
        sys.path.remove(str(ROOT / "bench"))
