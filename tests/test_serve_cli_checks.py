"""``t2fast serve``'s command-line checks that run before vLLM is imported: repeated names,
expert names (invalid, reserved, the base model's), the classifier named by --classifier and
the MODEL argument; and the server's own errors printed with one "t2fast serve:" prefix.

No test starts vLLM: the start is replaced by a failure (:func:`no_start`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from t2fast import cli
from t2fast.serve import cli as serve_cli

EXPERTS = Path(__file__).resolve().parent.parent / "experts"
ARITH, STRINGS = str(EXPERTS / "arith.safetensors"), str(EXPERTS / "strings.safetensors")
CLASSIFY = str(EXPERTS / "classify.safetensors")


@pytest.fixture
def no_start(monkeypatch):
    """Importing or starting vLLM fails the test: the checks must stop the command first."""
    import t2fast.vllm.environment as environment

    def refuse(*a, **k):
        raise AssertionError("vLLM would start: the options were not refused before")
    monkeypatch.setattr(environment, "import_vllm", refuse)
    monkeypatch.setattr(serve_cli, "check_plugins_installed", refuse)


def usage_error(capsys, argv: list[str], option: str) -> str:
    """``t2fast serve ARGV`` stops with exit status 2 and one line naming ``option``."""
    assert cli.main(["serve", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert f"t2fast serve: error: argument {option}: " in err, err
    return err.strip().splitlines()[-1]


def checked(argv: list[str], extra: list[str] = ()):
    """``check_args`` of ``t2fast serve ARGV`` (raises SystemExit on a usage error)."""
    args, rest = cli.build_parser().parse_known_args(["serve", *argv])
    args._extra = [*rest, *extra]
    serve_cli.check_args(args)
    return args


@pytest.fixture
def profiles(tmp_path):
    out = []
    for n in (1, 2):
        p = tmp_path / f"p{n}.json"
        p.write_text(json.dumps({}))
        out.append(str(p))
    return out


def test_a_name_given_twice_is_a_usage_error(capsys, no_start, profiles):
    err = usage_error(capsys, ["tiny", "--experts", f"a={ARITH}", f"a={STRINGS}"], "--experts")
    assert "expert name 'a' is given twice" in err and f"a={ARITH}" in err
    err = usage_error(capsys, ["tiny", "--profiles", f"fast={profiles[0]}",
                               f"fast={profiles[1]}"], "--profiles")
    assert "profile name 'fast' is given twice" in err
    err = usage_error(capsys, ["tiny", "--experts", f"c={ARITH}", "--classifier",
                               f"c={CLASSIFY}"], "--classifier")
    assert "expert name 'c' is given twice" in err
    # a NAME= entry against the name stored in an unnamed file
    err = usage_error(capsys, ["tiny", "--experts", ARITH, f"arith={STRINGS}"], "--experts")
    assert "expert name 'arith' is given twice" in err
    # the same file twice unnamed, in --experts or as --classifier too
    err = usage_error(capsys, ["tiny", "--experts", ARITH, ARITH], "--experts")
    assert f"{ARITH!r} is given twice" in err
    err = usage_error(capsys, ["tiny", "--experts", CLASSIFY, "--classifier", CLASSIFY],
                      "--classifier")
    assert "is given twice" in err and "name it by its expert name" in err


def test_expert_names_are_checked_before_the_start(capsys, no_start):
    err = usage_error(capsys, ["tiny", "--experts", f"base={ARITH}"], "--experts")
    assert "may not be 'base'" in err
    err = usage_error(capsys, ["tiny", "--experts", f"bad/name={ARITH}"], "--experts")
    assert "'bad/name' is not valid" in err
    err = usage_error(capsys, ["tiny", "--experts", f"tiny={ARITH}"], "--experts")
    assert "expert name 'tiny' is the base model's served name" in err
    err = usage_error(capsys, ["tiny", "--classifier", f"base={CLASSIFY}", "--adapt",
                               "classifier"], "--classifier")
    assert "may not be 'base'" in err
    # vLLM's --served-model-name (passed on) names the base model instead of MODEL
    args = checked(["tiny", "--experts", f"tiny={ARITH}"], ["--served-model-name", "a", "b"])
    assert serve_cli.base_names(args) == ["a", "b"]
    with pytest.raises(SystemExit):
        checked(["tiny", "--experts", f"b={ARITH}"], ["--served-model-name", "a", "b"])
    with pytest.raises(SystemExit):
        checked(["tiny", "--experts", f"m={ARITH}"], ["--served_model_name=m"])
    capsys.readouterr()


def test_a_bad_expert_file_is_a_usage_error(capsys, no_start, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for entry, option in ((str(bad), "--experts"), (f"m={bad}", "--experts"),
                          (f"c={bad}", "--classifier")):    # named: read after start-up before
        err = usage_error(capsys, ["tiny", option, entry], option)
        assert str(bad) in err


def test_a_classifier_name_must_name_one_of_the_experts(capsys, no_start):
    err = usage_error(capsys, ["tiny", "--experts", ARITH, "--classifier", "classify",
                               "--adapt", "classifier"], "--classifier")
    assert "'classify'" in err and "['arith']" in err
    err = usage_error(capsys, ["tiny", "--classifier", "classify", "--adapt", "classifier"],
                      "--classifier")
    assert "none)" in err
    # by the name stored in an unnamed file, or by a NAME= entry's name
    checked(["tiny", "--experts", ARITH, CLASSIFY, "--classifier", "classify", "--adapt",
             "classifier"])
    checked(["tiny", "--experts", f"sorter={CLASSIFY}", "--classifier", "sorter"])
    # the usual command line passes
    checked(["tiny", "--experts", ARITH, STRINGS, "--classifier", CLASSIFY, "--adapt",
             "classifier"])


def test_the_server_error_is_printed_with_one_prefix(capsys, monkeypatch):
    """An error of the server's own start (t2fast.serve.startup, t2fast.serve.config) reads
    "t2fast serve: error: MESSAGE", not "t2fast serve: error: t2fast serve: MESSAGE"."""
    import t2fast.vllm.environment as environment

    message = ("t2fast serve: the classifier 'classify' is not among the loaded experts "
               "['arith']")

    def start(args, extra, known=()):
        raise ValueError(message)
    monkeypatch.setattr(environment, "import_vllm", lambda: None)
    monkeypatch.setattr(serve_cli, "check_plugins_installed", lambda: None)
    monkeypatch.setattr(serve_cli, "allowlist_plugins", lambda: None)
    monkeypatch.setattr(serve_cli, "vllm_arguments", start)
    monkeypatch.setattr(serve_cli, "vllm_parser",             # runs without vLLM too
                        lambda: argparse.ArgumentParser(add_help=False))
    assert cli.main(["serve", "tiny", "--experts", ARITH]) == 2
    err = capsys.readouterr().err
    assert "t2fast serve: error: the classifier 'classify' is not among" in err, err
    assert err.count("t2fast serve:") == 1, err


def test_the_model_argument_is_checked(capsys, no_start, tmp_path):
    err = usage_error(capsys, ["/nonexistent/model"], "model")
    assert "'/nonexistent/model': no such model folder" in err
    for missing in ("./no-such-model", "../no-such-model", "~/no-such-model-t2fast"):
        assert "no such model folder" in usage_error(capsys, [missing], "model")
    err = usage_error(capsys, [ARITH], "model")
    assert "is a file, not a model folder" in err
    err = usage_error(capsys, [str(tmp_path)], "model")
    assert "without config.json" in err
    (tmp_path / "config.json").write_text("{}")
    checked([str(tmp_path)])                    # a model folder: left to vLLM
    checked(["tiny"])
    for hub_id in ("Qwen/Qwen2.5-0.5B-Instruct", "gpt2"):   # no such path: a hub id
        checked([hub_id])
    assert "no such model folder" in usage_error(capsys, ["a/b/c"], "model")
