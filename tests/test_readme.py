"""The README's ten-line example runs and prints what the README says it prints."""
import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ten_line_example() -> tuple[str, str]:
    """The README's ten-line example: its code and the output the README says it prints."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten lines", 1)[1].split("\n## ", 1)[0]
    code, printed = re.findall(r"```(?:python|text)\n(.*?)```", section, re.S)
    return code, printed


def test_ten_line_example_prints_the_documented_answers(monkeypatch, tmp_path):
    code, printed = ten_line_example()
    monkeypatch.chdir(tmp_path)                      # runs from any folder
    # as a user on a CPU runs it: the torch backend, not the (slow) Triton interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == printed


def test_api_doc_wraps_at_100_columns():
    lines = (ROOT / "docs" / "API.md").read_text(encoding="utf-8").splitlines()
    long = [i for i, line in enumerate(lines, 1) if len(line) > 100]
    assert len(lines) > 50 and not long, f"docs/API.md lines over 100 columns: {long}"
