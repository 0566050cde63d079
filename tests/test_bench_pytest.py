"""The pytest-benchmark comparisons (``make bench``) write a JSON run in which every group is one
(shape, T) holding the same five implementations on the same problem, so ratios compare like
with like. Runs the smallest CPU groups (the kernels through Triton's interpreter)."""
import json
import pathlib
import subprocess
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMPLS = {"dense", "composition", "materialize", "triton", "triton-mix"}


def test_bench_groups_hold_the_five_paths_of_one_problem(tmp_path):
    out = tmp_path / "run.json"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_svf_matmul.py", "--benchmark-only",
         "-q", "-p", "no:cacheprovider", "-k=small-k-T", f"--benchmark-json={out}",
         "--benchmark-max-time=0.01", "--benchmark-min-rounds=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    run = json.loads(out.read_text())
    groups = defaultdict(list)
    for b in run["benchmarks"]:
        groups[b["group"]].append(b)
    assert sorted(groups) == ["cpu-small k 64x256 T=1", "cpu-small k 64x256 T=16"]
    for name, members in groups.items():
        assert {b["extra_info"]["impl"] for b in members} == IMPLS, name
        problems = {tuple(b["extra_info"][k] for k in ("m", "n", "T", "slots", "dtype"))
                    for b in members}
        assert len(problems) == 1, (name, problems)
        assert all(b["stats"]["min"] > 0 for b in members)
    assert run["machine_info"] and run["commit_info"]     # provenance saved with the times


def test_readme_bench_table_is_the_saved_run():
    """The README's CPU table was printed by the run saved beside it (min, median, rounds)."""
    readme = (ROOT / "README.md").read_text()
    run = readme.split("(`bench/results/pytest-benchmark/cpu/", 1)[1].split("`", 1)[0]
    saved = ROOT / "bench" / "results" / "pytest-benchmark" / "cpu" / run
    stats = {b["name"]: b["stats"] for b in json.loads(saved.read_text())["benchmarks"]}
    table = readme.split("benchmark 'cpu-small", 1)[1].split("```", 1)[0]
    rows = [line.split() for line in table.splitlines() if line.startswith("test_svf[")]
    assert len(rows) == len(IMPLS)
    for name, mn, _, med, _, _, _, rounds in rows:
        s = stats[name]
        assert (mn, med) == (f"{s['min'] * 1e6:,.4f}", f"{s['median'] * 1e6:,.4f}"), name
        assert int(rounds) == s["rounds"]
