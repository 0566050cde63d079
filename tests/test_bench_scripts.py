"""The decode-step benchmark runs end to end on the CPU (``--small``: eager steps, tiny dims):
every variant is timed on its own live model, and the per-row step follows ``set_mixture``.
CPU times say nothing about GPU speed; this only keeps the script working."""
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
    (run,) = json.loads(path.read_text())["runs"]
    assert set(run["step_us"]) == {"unpatched", "per_row", "per_row_mlp", "lean_base"}
    assert run["per_row_graph_follows_set_mixture"] is True and not run["capture_errors"]
    assert all(v > 0 for v in run["step_us"].values())
