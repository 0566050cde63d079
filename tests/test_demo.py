"""The demo runs end to end (random model, a few rows) and reports what it claims to."""
import re

import pytest

from t2fast import demo


def test_demo_runs_on_random_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("T2FAST_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)                      # no shipped experts here: stand-ins
    out = demo.main(["--random", "--rows-per-family", "2", "--max-new-tokens", "3",
                     "--backend", "torch"])
    text = capsys.readouterr().out
    assert "random stand-in" in text and "path: factored" in text
    assert set(out["per_family"]) == {"arith", "strings", "choice"}
    assert all(n == 2 for n, _, _ in out["per_family"].values())
    assert len(out["timing"]) == 3 and all(s > 0 for s, _ in out["timing"].values())
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 28


@pytest.mark.parametrize("argv, pattern", [
    (["--rows-per-family", "0"], r"--rows-per-family: .*an integer in \[1, 500\]"),
    (["--rows-per-family", "100000"], r"--rows-per-family: .*an integer in \[1, 500\]"),
    (["--max-new-tokens", "0"], r"--max-new-tokens: .*an integer >= 1"),
    (["--show", "-1"], r"--show: .*an integer >= 0"),
])
def test_demo_arguments_are_checked(argv, pattern, capsys):
    """Before, these ended in a traceback from generate or the task (or, --show, were taken)."""
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)
