"""GPU results committed under bench/results/: each kernel sweep's table is what
``bench/svf_perf.py --render`` makes of its JSON, and every result file that bench/NOTES.md cites
is there."""
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SWEEPS = sorted(p for p in RESULTS.glob("*.json") if "kernels" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_table_is_rendered_from_its_json(path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from svf_perf import render_markdown
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert path.with_suffix(".md").read_text() == render_markdown(json.loads(path.read_text()))


def test_notes_cite_committed_results():
    notes = (ROOT / "bench" / "NOTES.md").read_text()
    cited = set(re.findall(r"bench/results/([\w.\-]+\.(?:json|md|log))", notes))
    assert SWEEPS and cited, "bench/NOTES.md cites no GPU result files"
    assert not {c for c in cited if not (RESULTS / c).exists()}
