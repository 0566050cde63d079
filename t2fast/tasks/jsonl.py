"""Adapters for real data sets supplied by the user as JSONL files (nothing is downloaded).

* ``GSM8KTask``: records ``{"question", "answer"}`` where the answer ends in ``#### N``. A
  generation is scored like the paper's math evaluation: the number right after the last "The
  answer is", else the last number in the text, compared numerically.
* ``ARCTask``: records in the Hugging Face layout ``{"question", "choices": {"text", "label"},
  "answerKey"}`` or the original one ``{"question": {"stem", "choices": [{"text", "label"}]},
  "answerKey"}``. The answer is the option label: the whole answer (after "the answer is", if
  any) as a label or as an option's text (any case; with numbered options a letter names the
  option at its position), else the first standalone label, else an option's full text.
* ``MBPPTask`` (``{"text", "code", "test_list", "test_setup_code"}``, or the sanitized layout's
  ``{"prompt", "code", "test_list", "test_imports"}``) and ``HumanEvalTask``
  (``{"prompt", "entry_point", "canonical_solution", "test"}``): the code of a generation (the
  first fenced code block, else the whole text) is run against the tests in a separate Python
  process with a time limit, and passes when it runs past the last test (exiting early is a
  failure); unparsable means no code that compiles. That runs model-written
  code on this machine, outside any sandbox (a temporary folder, a time limit, the process
  group killed afterwards): these tasks refuse to load unless ``T2FAST_ALLOW_CODE_EXECUTION=1``
  is set (run them in a container or a throw-away machine).

Splits: pass ``split="test"`` (or any split) when the file is one split; leave it ``None`` to
divide the records 80/10/10 by a hash of the question, like the bundled families. Use
``get_task("gsm8k:path/to/file.jsonl")`` (also ``arc:``, ``mbpp:``, ``humaneval:``) for the
hashed split.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from typing import Any, Iterable

from .base import (DEFAULT_SEED, PROMPT_TEMPLATE, QUESTION_PREFIX, Example, ScoreResult, Task,
                   check_split, split_of)
from .extract import (WORD_STRIP, after_answer_marker, extract_choice, extract_last_number,
                      numbers_equal)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (blank lines skipped; a clear error names a bad line)."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, record)`` of each non-blank line of a JSONL file.

    Raises:
        ValueError naming ``file:line`` for a line that is not JSON or not UTF-8.
    """
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return records


def field_of(record: dict, key: str, kind: type | tuple = str):
    """``record[key]``, checked to be of ``kind`` (a non-empty list for ``list``).

    Raises:
        ValueError naming the field.
    """
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is list and not value):
        want = "a non-empty list" if kind is list else \
            " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"field {key!r} must be {want}, got {type(value).__name__} "
                         f"{str(value)[:40]!r}")
    return value


class JsonlTask(Task):
    """A task whose examples come from a JSONL file (see the module docstring)."""

    name = "jsonl"
    #: Appended to the question in the prompt (tells the model how to state its answer).
    instruction = ""
    #: Whether generations are scored against ``answer`` (a code task runs its tests instead,
    #: so two reference solutions of one question do not conflict).
    answer_scored = True

    def __init__(self, path: str | os.PathLike, split: str | None = None, name: str | None = None,
                 template: str = PROMPT_TEMPLATE, seed: int = DEFAULT_SEED):
        super().__init__(seed)
        if name is not None:
            self.name = self.family = name
        self.path = pathlib.Path(path)
        self.split = check_split(split) if split is not None else None
        self.template = template
        self._examples, seen = [], {}
        for lineno, record in numbered_records(self.path):
            where = f"{self.path}:{lineno}"
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                ex = self.convert(record)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                why = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else exc
                raise ValueError(f"{where}: {self.name} record: {why}") from None
            first = seen.setdefault(ex.question, (lineno, ex.answer))
            if first[1] != ex.answer and self.answer_scored:
                raise ValueError(f"{where}: {self.name} record: the question of line "
                                 f"{first[0]} again, with another answer ({ex.answer!r}, "
                                 f"not {first[1]!r})")
            self._examples.append(ex)

    # -- conversion -----------------------------------------------------------------------
    def to_example(self, question: str, answer: str, meta: dict[str, Any],
                   instruction: str | None = None) -> Example:
        """``instruction``: this example's, instead of the task's :attr:`instruction`."""
        instruction = self.instruction if instruction is None else instruction
        text = question + (("\n" + instruction) if instruction else "")
        return Example(prompt=self.template.format(question=text), answer=answer,
                       family=self.family, question=question, meta=meta)

    def convert(self, record: dict) -> Example:
        raise NotImplementedError

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        if self.split is not None:
            chosen = self._examples if split == self.split else []
        else:
            chosen = [e for e in self._examples if split_of(self.name, e.question) == split]
        return chosen if n is None else chosen[:n]

    def iter_examples(self, split: str, distinct: bool = True):
        return iter(self.examples(split))

    def shortfall(self, split: str, n: int, have: int) -> str:
        """The counts, and how this file's splits are made."""
        text = super().shortfall(split, n, have)
        if self.split is None:
            return (f"{text} (KIND:FILE divides a file's records 80/10/10 into train / "
                    f"validation / test by a hash of the question; KIND@{split}:FILE takes the "
                    f"whole file)")
        if self.split != split:
            return (f"{text}: it is one file taken whole as its {self.split} split "
                    f"(KIND@{self.split}:FILE); use the {self.split} split, or KIND:FILE to "
                    f"divide the file 80/10/10")
        return text

    def __len__(self) -> int:
        return len(self._examples)


#: Where a generation goes on to write another question: the prompt template's ``Q:``, or
#: the ``Question:`` many models write.
_NEXT_QUESTION = re.compile(r"\n(?:" + re.escape(QUESTION_PREFIX.rstrip()) + r"|Question:)")


def own_answer(generation: str) -> str:
    """A generation up to the next question it goes on to write (``"\nQ:"`` of the prompt
    template, or ``"\nQuestion:"``): what follows answers another question, not this one."""
    return _NEXT_QUESTION.split(generation, maxsplit=1)[0]


# --------------------------------------------------------------------------------- GSM8K
def gsm8k_reference(answer_field: str) -> str:
    """The final answer of a GSM8K solution: the number after ``####``, commas removed.

    Raises:
        ValueError when there is no ``####`` or what follows it is not a number.
    """
    if "####" not in answer_field:
        raise ValueError("GSM8K answer has no '####' final answer")
    ref = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(\.\d+)?", ref):
        raise ValueError(f"GSM8K final answer after '####' is not a number: {ref[:40]!r}")
    return ref


class GSM8KTask(JsonlTask):
    name = "gsm8k"
    instruction = "Finish with: The answer is N."

    def convert(self, record: dict) -> Example:
        answer = field_of(record, "answer")
        return self.to_example(field_of(record, "question").strip(), gsm8k_reference(answer),
                               {"solution": answer})

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        return extract_last_number(own_answer(generation))

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None:
            return ScoreResult(False, False, None)
        return ScoreResult(numbers_equal(got, example.answer), True, got)


# ----------------------------------------------------------------------------------- ARC
def arc_fields(record: dict) -> tuple[str, list[str], list[str], str]:
    """(question, labels, option texts, answer label) of an ARC record in either layout."""
    q = field_of(record, "question", (str, dict))
    if isinstance(q, dict):  # original ARC layout
        stem = field_of(q, "stem")
        choices = field_of(q, "choices", list)
        if not all(isinstance(c, dict) for c in choices):
            raise ValueError("field 'choices' must be a list of {'label', 'text'} objects")
        labels = [str(c["label"]) for c in choices]
        texts = [str(c["text"]) for c in choices]
    else:
        stem = q
        choices = field_of(record, "choices", dict)
        labels = [str(l) for l in field_of(choices, "label", list)]
        texts = [str(t) for t in field_of(choices, "text", list)]
    if len(labels) != len(texts):
        raise ValueError(f"{len(labels)} option labels but {len(texts)} option texts")
    return stem.strip(), labels, texts, str(field_of(record, "answerKey", (str, int))).strip()


class ARCTask(JsonlTask):
    name = "arc"
    instruction = "Answer with the letter of the correct option."

    def convert(self, record: dict) -> Example:
        stem, labels, texts, key = arc_fields(record)
        if key not in labels:
            raise ValueError(f"ARC record {record.get('id')!r}: answerKey {key!r} not among "
                             f"{labels}")
        options = "\n".join(f"{l}) {t}" for l, t in zip(labels, texts))
        digits = all(l.isdigit() for l in labels)
        return self.to_example(f"{stem}\n{options}", key,
                               {"labels": labels, "options": texts, "id": record.get("id")},
                               self.instruction.replace("letter", "number") if digits else None)

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        """The option the answer names: its whole answer (after an "answer is" marker, if
        any) as a label, as an option's text (any case: "vitamin D" is not option D), or, with
        numbered options, as a letter (B: the second); else the first label it names."""
        labels = example.meta["labels"] if example is not None else list("ABCDE")
        texts = example.meta["options"] if example is not None else None
        generation = own_answer(generation)
        said = (after_answer_marker(generation) or generation).strip().strip(WORD_STRIP)
        said = said.split("\n", 1)[0].strip().strip(WORD_STRIP).casefold()
        by_label = {l.casefold(): l for l in labels}
        if all(l.isdigit() for l in labels):      # "B" for the second of options 1-4
            by_label.update({chr(ord("a") + i): l for i, l in enumerate(labels)})
        by_text = {str(t).strip().casefold(): l for l, t in zip(labels, texts or [])}
        if said in by_label or said in by_text:
            return by_label.get(said) or by_text[said]
        got = extract_choice(generation, labels, None, whole=True)
        if got is None and texts is not None:
            got = extract_choice(generation, labels, texts, whole=False)
        return got

    def score(self, generation: str, example: Example) -> ScoreResult:
        got = self.extract(generation, example)
        if got is None:
            return ScoreResult(False, False, None)
        return ScoreResult(got == example.answer, True, got)


# ------------------------------------------------------------------------- MBPP / HumanEval
_FENCE = re.compile(r"```[ \t]*(?:[A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
#: Where a HumanEval completion ends: the official harness's stop sequences (a new top-level
#: statement after the function body).
_COMPLETION_END = re.compile(r"\n(?=def |class |if |print|#)")


def extract_code(generation: str) -> str:
    """The first fenced code block of a generation, or the whole generation when it has none."""
    m = _FENCE.search(generation)
    code = m.group(1) if m else generation
    return code.replace("</s>", "").rstrip() + "\n"


def compiles(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


#: The environment variable that allows the code tasks to run model-written code.
ALLOW_CODE_ENV = "T2FAST_ALLOW_CODE_EXECUTION"


def check_code_execution_allowed(kind: str) -> None:
    """Raise unless :data:`ALLOW_CODE_ENV` is ``1`` (see the module docstring)."""
    if os.environ.get(ALLOW_CODE_ENV) != "1":
        raise ValueError(f"scoring {kind} runs model-written Python on this machine, outside "
                         f"any sandbox; set {ALLOW_CODE_ENV}=1 to allow it (in a container or "
                         f"a throw-away machine)")


def run_python(program: str, timeout: float = 10.0, must_print: str | None = None) -> bool:
    """Run ``program`` in a fresh, isolated Python process (its own process group) in a
    temporary folder, as a module not named ``__main__`` (a generation's ``if __name__ ==
    "__main__":`` block, often reading input, does not run); True when it exits with status 0
    within ``timeout`` seconds (and, with
    ``must_print``, wrote that text to its standard output). The whole process group is killed
    afterwards, so nothing it started in that group outlives the call (POSIX; a process that
    leaves the group, by ``setsid`` or a double fork, escapes)."""
    with tempfile.TemporaryDirectory() as tmp:
        file, out = pathlib.Path(tmp) / "program.py", pathlib.Path(tmp) / "stdout"
        file.write_text(program, encoding="utf-8")
        with out.open("wb") as sink:
            run = f"import runpy; runpy.run_path({str(file)!r}, run_name='__t2fast__')"
            proc = subprocess.Popen([sys.executable, "-I", "-c", run], cwd=tmp, stdout=sink,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                    start_new_session=os.name == "posix")
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if os.name == "posix":
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):   # the group is gone already
                    pass
            else:
                proc.kill()
            proc.wait()
        if returncode != 0 or must_print is None:
            return returncode == 0
        with out.open("rb") as f:       # its last 64 KiB: enough for the line, whatever it
            f.seek(max(0, out.stat().st_size - (64 << 10)))    # printed before
            return must_print.encode() in f.read()


class _CodeTask(JsonlTask):
    timeout = 10.0
    answer_scored = False

    def __init__(self, *args, **kwargs):
        check_code_execution_allowed(self.name)
        super().__init__(*args, **kwargs)

    def program(self, code: str, example: Example) -> str:
        raise NotImplementedError

    def extract(self, generation: str, example: Example | None = None) -> str | None:
        code = extract_code(own_answer(generation))   # not the next question it writes
        return code if code.strip() else None

    def score(self, generation: str, example: Example) -> ScoreResult:
        """Correct when the program (the code, then the tests) runs to its end: a line the
        harness prints after the last test, unknown to the code, must appear (exit status 0
        alone passed code that exits early: ``sys.exit(0)``, ``os._exit(0)``, ``raise
        SystemExit`` in the function under test)."""
        code = self.extract(generation, example)
        if code is None:
            return ScoreResult(False, False, None)
        program = self.program(code, example)
        if not compiles(program):
            return ScoreResult(False, False, code)
        done = f"t2fast-tests-passed-{secrets.token_hex(16)}"
        return ScoreResult(run_python(f"{program}\nprint({done!r})\n", self.timeout, done),
                           True, code)


class MBPPTask(_CodeTask):
    name = "mbpp"
    instruction = "Answer with Python code only."

    def convert(self, record: dict) -> Example:
        tests = field_of(record, "test_list", list)
        if not all(isinstance(t, str) for t in tests):
            raise ValueError("field 'test_list' must hold strings (assert statements)")
        imports = record.get("test_imports") or []        # the sanitized layout's
        if not (isinstance(imports, list) and all(isinstance(i, str) for i in imports)):
            raise ValueError("field 'test_imports' must hold strings (import statements)")
        text = field_of(record, "text" if "text" in record else "prompt")   # sanitized: prompt
        question = f"{text.strip()}\nYour code should pass this test:\n{tests[0]}"
        setup = "\n".join([*imports, record.get("test_setup_code", "") or ""])
        return self.to_example(question, record.get("code", ""),
                               {"tests": tests, "setup": setup,
                                "task_id": record.get("task_id")})

    def program(self, code: str, example: Example) -> str:
        return "\n".join([example.meta["setup"], code, *example.meta["tests"], ""])


class HumanEvalTask(_CodeTask):
    name = "humaneval"
    instruction = ""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("template", "{question}")  # the prompt is code to be completed
        super().__init__(*args, **kwargs)

    def convert(self, record: dict) -> Example:
        prompt = field_of(record, "prompt")
        return self.to_example(prompt, record.get("canonical_solution", ""),
                               {"test": field_of(record, "test"),
                                "entry_point": field_of(record, "entry_point"),
                                "task_id": record.get("task_id"), "code_prompt": prompt})

    def program(self, code: str, example: Example) -> str:
        entry = example.meta["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            body = example.meta["code_prompt"] + "\n" + code  # a whole function (redefines it)
        else:                                            # a completion of the prompt
            body = example.meta["code_prompt"] + _COMPLETION_END.split(code, maxsplit=1)[0]
        return f"{body}\n\n{example.meta['test']}\n\ncheck({entry})\n"


ADAPTERS: dict[str, type[JsonlTask]] = {
    "gsm8k": GSM8KTask, "arc": ARCTask, "mbpp": MBPPTask, "humaneval": HumanEvalTask,
}


def load_jsonl_task(kind: str, path: str | os.PathLike, split: str | None = None,
                    **kwargs) -> JsonlTask:
    """An adapter over a user-supplied file: ``kind`` is gsm8k, arc, mbpp or humaneval."""
    try:
        cls = ADAPTERS[kind]
    except KeyError:
        raise KeyError(f"unknown data set kind {kind!r}; known: {', '.join(ADAPTERS)}") from None
    return cls(path, split=split, **kwargs)


def score_all(task: Task, generations: Iterable[str],
              examples: Iterable[Example]) -> list[ScoreResult]:
    return [task.score(g, e) for g, e in zip(generations, examples)]
