"""The README's ten-line example runs and prints what the README says it prints."""
import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ten_line_example_prints_the_documented_answers(monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten lines", 1)[1].split("\n## ", 1)[0]
    code, printed = re.findall(r"```(?:python|text)\n(.*?)```", section, re.S)
    monkeypatch.chdir(ROOT)
    # as a user on a CPU runs it: the torch backend, not the (slow) Triton interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == printed
