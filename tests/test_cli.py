"""The t2fast command line: train / eval / adapt on a random tiny model, errors, the registry."""
import argparse
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import re
import signal
import sys

import pytest
import torch

from t2fast import cli
from t2fast.experts import load_expert

MODEL = ["--model", "random:0:1", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    paths = []
    for task in ("arith", "strings"):
        out = d / f"{task}.safetensors"
        rc = cli.main(["train", "--task", task, "--out", str(out), *MODEL, "--steps", "2",
                       "--batch-size", "4", "--samples-per-prompt", "2", "--eval-n", "8",
                       "--eval-every", "1", "--no-progress", "--no-cache", "--kl-coef", "0.1"])
        assert rc == 0
        paths.append(out)
    return paths


def test_train_on_a_jsonl_data_set_and_a_bare_random_model(tmp_path):
    """``--task gsm8k:FILE`` trains like ``eval --task gsm8k:FILE`` evaluates, and ``--model
    random`` (no seed) is the documented form."""
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i + 1}?",
                                        "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"})
                            + "\n" for i in range(40)))
    out = tmp_path / "gsm.safetensors"
    rc = cli.main(["train", "--task", f"gsm8k:{data}", "--out", str(out), "--model", "random",
                   "--threads", "1", "--steps", "1", "--batch-size", "2",
                   "--samples-per-prompt", "2", "--eval-n", "2", "--eval-every", "1",
                   "--no-progress", "--no-cache"])
    assert rc == 0 and load_expert(out).extra["task"] == f"gsm8k:{data}"


def test_train_writes_expert_log_and_removes_checkpoint(experts, capsys):
    e = load_expert(experts[0])
    assert e.name == "arith" and e.extra["task"] == "arith"
    assert e.extra["config"]["kl_coef"] == 0.1
    assert e.extra["config"]["extra"]["command"].startswith("t2fast train --task arith")
    log = [json.loads(l) for l in open(str(experts[0]) + ".log.jsonl")]
    assert [r["event"] for r in log].count("step") == 2
    assert not (experts[0].parent / "arith.safetensors.state.pt").exists()


@pytest.mark.parametrize("kl", [[], ["--kl-coef", "0"]], ids=["default-kl", "no-kl"])
def test_train_default_path_with_progress_bar(tmp_path, capsys, kl):
    """``t2fast train`` as a user types it: progress bar on, KL at its default (or off)."""
    out = tmp_path / "e.safetensors"
    rc = cli.main(["train", "--task", "arith", "--out", str(out), *MODEL, "--steps", "2",
                   "--batch-size", "4", "--samples-per-prompt", "2", "--eval-n", "4",
                   "--no-cache", *kl])
    assert rc == 0
    assert "train arith" in capsys.readouterr().err          # the bar was drawn
    from t2fast.train import TrainConfig
    assert load_expert(out).extra["config"]["kl_coef"] == (0.0 if kl else
                                                          TrainConfig().kl_coef)
    assert TrainConfig().kl_coef > 0                          # KL to the base is on by default
    steps = [json.loads(l) for l in open(str(out) + ".log.jsonl")]
    kls = [r["kl"] for r in steps if r.get("event") == "step"]
    assert len(kls) == 2 and all((k is None) == bool(kl) for k in kls)


def test_eval_base_and_expert(experts, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--task", "arith", *MODEL, "--n", "6", "--expert",
                     str(experts[0]), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 6 and r["what"] == "expert arith" and len(r["ci95"]) == 2
    assert cli.main(["eval", "--task", "arith", *MODEL, "--n", "4"]) == 0
    assert "base: arith:" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["prompt", "uniform", "base", "expert:strings", "cem",
                                      "classifier"])
def test_adapt_strategies(experts, tmp_path, strategy, capsys):
    out = tmp_path / "a.json"
    extra = ["--classifier", str(experts[1])] if strategy == "classifier" else []
    profile = tmp_path / "profile.json"
    if strategy == "cem":
        extra = ["--save-profile", str(profile), "--shots", "2", "--cem-iterations", "1",
                 "--cem-population", "3"]
    experts_arg = [str(experts[0])] if strategy == "classifier" else [str(p) for p in experts]
    args = ["adapt", *MODEL, "--experts", *experts_arg, "--strategy", strategy, "--task",
            "arith_chain", "--n", "4", "--json", str(out), *extra]
    assert cli.main(args) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 4 and r["pass2_s"] > 0
    if strategy == "cem":
        assert len(r["cem"]["alpha"]) == 2 and r["shot_set"] == 0
        assert r["cem"]["check_shots"] == 1            # by default half of the --shots decide
        assert json.loads(profile.read_text())["meta"]["check_shots"] == 1
        assert re.search(r"few-shot accuracy [\d.]+ on the 1 held-out shot \(",
                         capsys.readouterr().out)
        from t2fast.serve.profiles import load_profile
        saved = load_profile(profile)          # by expert name, the base model's weight too
        if r["cem"]["kept_base"]:
            assert saved == {"base": 1.0} and r["cem"]["spec"] is None
        else:
            assert saved == r["cem"]["spec"]
            assert list(saved.values())[1:] == r["cem"]["alpha"]
    if strategy in ("prompt", "classifier"):
        assert sum(r["pass1_labels"].values()) == 4


def test_adapt_restate_on_the_transfer_base(tmp_path, capsys):
    """--restate: the transfer base restates the word questions as its parent family's, the
    classification expert routes them, the parent's expert answers them."""
    tb = pathlib.Path(__file__).resolve().parent.parent / "results" / "transfer_base"
    ex = [str(tb / "experts" / f"{f}.safetensors") for f in ("arith", "strings", "choice")]
    base = ["adapt", "--model", str(tb), "--threads", "1", "--experts", *ex, "--strategy",
            "classifier", "--classifier", str(tb / "experts" / "classify.safetensors")]
    out = tmp_path / "r.json"
    assert cli.main([*base, "--task", "choice_words", "--n", "12", "--restate", "--json",
                     str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["restated"] is True and r["pass1_labels"] == {"choice": 12}
    assert "restated 12 of 12 prompts\n" in capsys.readouterr().err
    assert cli.main([*base, "--prompt", "step by step: what is 147 plus 8?", "--restate"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["answered"] == "Q: 147+8=?\nA: " and row["label"] == "arith"
    assert re.fullmatch(r"\d+", row["output"].split("\n")[0].strip())     # a number


@pytest.mark.parametrize("strategy", ["cem", "classifier"])
def test_adapt_batch_size_bounds_every_pass(tmp_path, strategy):
    """--batch-size caps the rows of every forward: the restatement, pass 1, cem's scoring
    (generation and likelihood) and pass 2."""
    tb = pathlib.Path(__file__).resolve().parent.parent / "results" / "transfer_base"
    ex = [str(tb / "experts" / f"{f}.safetensors") for f in ("arith", "strings", "choice")]
    rows = []

    def record(module, args):
        if isinstance(module, torch.nn.Embedding):
            rows.append(args[0].shape[0])
    own = ["--shots", "4", "--cem-iterations", "1", "--cem-population", "3"] \
        if strategy == "cem" else ["--classifier", str(tb / "experts" / "classify.safetensors")]
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert cli.main(["adapt", "--model", str(tb), "--threads", "1", "--experts", *ex,
                         "--strategy", strategy, *own, "--restate", "--task", "choice_words",
                         "--n", "5", "--batch-size", "2"]) == 0
    finally:
        hook.remove()
    assert rows and max(rows) == 2


def test_adapt_cem_restate_searches_on_restated_shots(tmp_path, capsys):
    """cem --restate: the shots are restated like the test questions and scored as the
    parent family's questions; the summary says so, and the saved profile (which only a
    --restate server serves)."""
    tb = pathlib.Path(__file__).resolve().parent.parent / "results" / "transfer_base"
    ex = [str(tb / "experts" / f"{f}.safetensors") for f in ("arith", "strings", "choice")]
    out, profile = tmp_path / "r.json", tmp_path / "p.json"
    assert cli.main(["adapt", "--model", str(tb), "--threads", "1", "--experts", *ex,
                     "--strategy", "cem", "--restate", "--task", "choice_steps", "--n", "6",
                     "--shots", "4", "--cem-iterations", "1", "--cem-population", "3",
                     "--save-profile", str(profile), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["restated"] is True and r["restated_shots"] == 4 and r["restated_prompts"] == 6
    assert r["cem"]["check_shots"] == 2
    err = capsys.readouterr().err
    assert "restated 4 of 4 cem shots, scored as choice questions" in err
    assert json.loads(profile.read_text())["meta"]["restated"] is True


def test_adapt_restate_says_when_the_model_restates_nothing(experts, capsys):
    """A model never taught to restate writes no first step: every prompt is answered as
    asked, and the command says so."""
    assert cli.main(["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "base",
                     "--prompt", "1+1", "2+2", "--restate", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "restated 0 of 2 prompts; the model wrote no first step for any" in err


def test_adapt_defaults_and_cem_shot_set(experts, tmp_path, monkeypatch):
    """--n defaults to 500 (the results table's size); cem's few-shot examples are block
    --shot-set (default: --seed) of the validation split."""
    from t2fast.adapt import fewshot_examples
    from t2fast.tasks import get_task
    args = cli.build_parser().parse_args(["adapt", "--experts", str(experts[0]), "--task",
                                          "arith"])
    assert args.n == 500 and args.shot_set is None
    seen = []
    import t2fast.adapt
    real = t2fast.adapt.fewshot_cem
    monkeypatch.setattr(t2fast.adapt, "fewshot_cem",
                        lambda h, t, task, shots, cfg, **kw: seen.append((shots, cfg.seed)) or
                        real(h, t, task, shots, cfg, **kw))
    base = ["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "cem", "--task",
            "arith_chain", "--n", "2", "--shots", "2", "--cem-iterations", "1",
            "--cem-population", "2", "--json", str(tmp_path / "c.json")]
    assert cli.main([*base, "--seed", "2"]) == 0
    assert cli.main([*base, "--seed", "2", "--shot-set", "0"]) == 0
    task = get_task("arith_chain")
    val = task.examples("validation", 6)
    assert [(s, seed) for s, seed in seen] == [(val[4:6], 2), (val[0:2], 2)]
    assert fewshot_examples(task, 2, 2) == val[4:6]
    with pytest.raises(ValueError, match="shot_set"):
        fewshot_examples(task, 2, -1)


def test_adapt_cem_absolute_profile(experts, tmp_path):
    """--cem-absolute: the paper's α (no base weight), saved by expert name."""
    from t2fast.serve.profiles import load_profile
    out, profile = tmp_path / "a.json", tmp_path / "p.json"
    assert cli.main(["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "cem",
                     "--task", "arith_chain", "--n", "2", "--shots", "2", "--cem-iterations",
                     "1", "--cem-population", "3", "--cem-absolute", "--cem-objective",
                     "accuracy", "--save-profile", str(profile), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert not r["cem"]["kept_base"] and r["cem"]["spec"] == r["cem"]["alpha"]
    assert r["cem"]["check_shots"] == 0                # nothing decides: no shot held out
    assert list(load_profile(profile).values()) == r["cem"]["alpha"]
    per_layer = {"base": [0.5, 1.0], "x": [0.5, 0.0]}
    assert cli.profile_weights(per_layer, ["x"]) == ([[0.5, 0.5], [1.0, 0.0]], ["base", "x"])


def test_adapt_on_prompts(experts, capsys):
    assert cli.main(["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "prompt",
                     "--prompt", "1+2=?", "reverse('ab')", "Q: 4+64=?", "Q: 5+1=?\nA:"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [l["prompt"] for l in lines] == ["Q: 1+2=?\nA: ", "Q: reverse('ab')\nA: ",
                                            "Q: 4+64=?\nA: ", "Q: 5+1=?\nA: "]
    assert cli.main(["adapt", *MODEL, "--experts", str(experts[0]), "--prompt", " "]) == 2
    assert "argument --prompt: a prompt holds no question" in capsys.readouterr().err


def test_options_of_another_strategy_are_refused(experts, capsys):
    """--classifier without the classifier strategy, and cem's options without cem, were
    silently ignored."""
    base = ["adapt", *MODEL, "--experts", str(experts[0]), "--task", "arith", "--n", "1"]
    err = _usage_error(capsys, [*base, "--classifier", str(experts[1])], "--classifier")
    assert "is pass 1 of --strategy classifier; the strategy here is prompt" in err
    for option, named in ((["--shots", "3"], "--shots"), (["--cem-std=0.5"], "--cem-std"),
                          (["--per-layer"], "--per-layer"), (["--seed", "1"], "--seed"),
                          (["--cem-iter", "5"], "--cem-iterations"), (["--norm"], "--normalize")):
        err = _usage_error(capsys, [*base, "--strategy", "classifier", "--classifier",
                                    str(experts[1]), *option], named)
        assert "sets cem's search; it needs --strategy cem (the strategy here is classifier)" \
            in err
    assert cli.main([*base, "--n", "1"]) == 0           # --n: no abbreviation of --normalize


def test_errors(experts, tmp_path, capsys):
    assert cli.main(["adapt", *MODEL, "--experts", str(experts[0]), "--strategy",
                     "expert:nope", "--task", "arith", "--n", "1"]) == 2
    assert "error" in capsys.readouterr().err
    assert cli.main(["train", "--task", "arith", "--out", "x.safetensors", "--layers",
                     "a:b"]) == 2
    assert "argument --layers" in capsys.readouterr().err
    assert cli.main([]) == 2


def _usage_error(capsys, argv, option):
    """``main(argv)`` stops with exit status 2 and a message naming ``option``."""
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or starting vLLM fails the test: every usage error is found before any
    work starts."""
    import t2fast.serve.cli as serve_cli

    def refuse(*a, **k):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(serve_cli, "check_plugins_installed", refuse)


def _bad_options(tmp_path, experts):
    """(argv, the option its error names) for every kind of bad value, per subcommand."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    under_file = str(a_file / "r.json")
    train = ["train", "--task", "arith", "--out", str(tmp_path / "t.safetensors")]
    ev = ["eval", "--task", "arith"]
    ad = ["adapt", "--experts", *map(str, experts), "--task", "arith"]
    cem = [*ad, "--strategy", "cem"]
    cases = [
        (train + ["--steps", "0"], "--steps"), (train + ["--batch-size", "0"], "--batch-size"),
        (train + ["--batch-size", "-1"], "--batch-size"), (train + ["--lr", "-1"], "--lr"),
        (train + ["--lr", "nan"], "--lr"), (train + ["--temperature", "0"], "--temperature"),
        (train + ["--threads", "0"], "--threads"), (train + ["--top-k", "-1"], "--top-k"),
        (train + ["--unparsable-penalty", "-2"], "--unparsable-penalty"),
        (train + ["--eval-split", "dev"], "--eval-split"),
        (train + ["--steps", "2", "--warmup-steps", "5"], "--warmup-steps"),
        (["train", "--task", "arith", "--out", under_file], "--out"),
        (train + ["--model", "random:1:0"], "--model"), (train + ["--task", "nope"], "--task"),
        (train + ["--resume"], "--resume"),
        (["train", "--task", "arith", "--method", "lora", "--out", str(a_file)], "--out"),
        (ev + ["--batch-size", "0"], "--batch-size"), (ev + ["--batch-size", "-1"], "--batch-size"),
        (ev + ["--threads", "-1"], "--threads"), (ev + ["--n", "0"], "--n"),
        (ev + ["--n", "-3"], "--n"), (ev + ["--n", "10000000"], "--n"),
        (ev + ["--model", "random:x"], "--model"),
        (ev + ["--model", str(tmp_path / "absent")], "--model"),
        (ev + ["--model", str(tmp_path)], "--model"),     # a folder without config.json
        (ev + ["--json", under_file], "--json"), (ev + ["--json", str(tmp_path)], "--json"),
        (ev + ["--split", "dev"], "--split"), (ev + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (ev + ["--expert", str(tmp_path / "absent.safetensors")], "--expert"),
        (ev + ["--device", "banana"], "--device"), (ev + ["--device", "cuda:99"], "--device"),
        (ev + ["--dtype", "float64"], "--dtype"), (ev + ["--attn", "magic"], "--attn"),
        (["eval", "--task", "nope"], "--task"),
        (ad + ["--n", "0"], "--n"), (ad + ["--batch-size", "0"], "--batch-size"),
        (ad + ["--strategy", "magic"], "--strategy"),
        (ad + ["--strategy", "expert:"], "--strategy"),
        (ad + ["--strategy", "classifier"], "--strategy"),
        (ad + ["--strategy", "expert:nope"], "--strategy"),
        (ad + ["--save-profile", str(tmp_path / "p.json")], "--save-profile"),
        (cem + ["--save-profile", under_file], "--save-profile"),
        (ad + ["--json", under_file], "--json"),
        (cem + ["--shots", "0"], "--shots"), (cem + ["--shot-set", "-1"], "--shot-set"),
        (cem + ["--shots", "10000000"], "--shots"),
        (cem + ["--cem-iterations", "0"], "--cem-iterations"),
        (cem + ["--cem-population", "1"], "--cem-population"),
        (cem + ["--cem-elite-ratio", "0"], "--cem-elite-ratio"),
        (cem + ["--cem-elite-ratio", "1.5"], "--cem-elite-ratio"),
        (cem + ["--cem-std", "0"], "--cem-std"),
        (cem + ["--cem-check-shots", "-1"], "--cem-check-shots"),
        (cem + ["--shots", "5", "--cem-check-shots", "5"], "--cem-check-shots"),
        (cem + ["--cem-check-shots", "2", "--cem-absolute"], "--cem-check-shots"),
        (["adapt", "--experts", *map(str, experts), "--prompt", "1+1", "--strategy", "cem"],
         "--strategy"),
        (["adapt", "--experts", str(tmp_path / "absent"), "--task", "arith"], "--experts"),
        (["serve", "tiny", "--max-experts", "0"], "--max-experts"),
        (["serve", "tiny", "--max-experts", "-1"], "--max-experts"),
        (["serve", "tiny", "--port", "70000"], "--port"),
        (["serve", "tiny", "--max-alpha-abs", "0"], "--max-alpha-abs"),
        (["serve", "tiny", "--experts", str(tmp_path / "absent")], "--experts"),
        (["serve", "tiny", "--experts", f"a={tmp_path / 'absent'}"], "--experts"),
        (["serve", "tiny", "--profiles", str(a_file)], "--profiles"),
        (["serve", "tiny", "--adapt", "magic"], "--adapt"),
        (["serve", "tiny", "--adapt", "classifier"], "--adapt"),
        (["serve", "tiny", "--restate", "--adapt-template", "paper"], "--restate"),
        (["serve", "tiny", "--adapt", "profile:p", "--profiles", f"q={a_file}"], "--adapt"),
        (["serve", "tiny", "--classifier", f"c={tmp_path / 'absent'}"], "--classifier"),
        (["serve", "tiny", "--allow-runtime-loading"], "--allow-runtime-loading"),
        (["serve", "tiny", "--runtime-loading-root", str(tmp_path)], "--runtime-loading-root"),
        (["serve", "tiny", "--allow-runtime-loading", "--runtime-loading-root", str(a_file)],
         "--runtime-loading-root"),
    ]
    if importlib.util.find_spec("flash_attn") is None:
        cases.append((ev + ["--attn", "flash_attention_2"], "--attn"))
    return cases


def test_every_bad_option_is_a_usage_error_before_any_work(experts, tmp_path, capsys,
                                                           no_model):
    for argv, option in _bad_options(tmp_path, experts):
        _usage_error(capsys, argv, option)
    err = _usage_error(capsys, ["eval", "--task", "arith", "--n", "10000000"], "--n")
    assert "10000000 examples asked for, but task 'arith' has" in err
    err = _usage_error(capsys, ["eval", "--task", "arith", "--batch-size", "0"], "--batch-size")
    assert "expected an integer >= 1, got '0'" in err


def test_flash_attention_needs_cuda_and_half_precision(capsys):
    import argparse
    from t2fast.cli_types import check_model_placement
    p = argparse.ArgumentParser(prog="t2fast eval")
    for dev, dtype, why in (("cpu", "bfloat16", "CUDA only"), ("cuda", "float32", "bfloat16")):
        with pytest.raises(SystemExit):
            check_model_placement(p, argparse.Namespace(attn="flash_attention_2", device=dev,
                                                        dtype=dtype))
        assert why in capsys.readouterr().err
    check_model_placement(p, argparse.Namespace(attn="flash_attention_2", device="cuda:0",
                                                dtype="bfloat16"))
    check_model_placement(p, argparse.Namespace(attn="sdpa", device="cpu", dtype="float32"))


def test_load_model_places_the_model(tmp_path):
    """--dtype / --attn / local folders; the defaults keep float32 on the CPU."""
    import torch
    from t2fast.models import tiny_model_path
    model, _ = cli.load_model("random:0:1")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model, _ = cli.load_model("random:0:1", "cpu", "bfloat16", "eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    model, tok = cli.load_model(str(tiny_model_path()), "cpu", "float16", "sdpa")
    assert model.dtype == torch.float16 and model.config._attn_implementation == "sdpa"
    assert tok("1+1").input_ids
    (tmp_path / "config.json").write_text((tiny_model_path() / "config.json").read_text())
    with pytest.raises(ValueError, match=r"--model '.*': "):   # no tokenizer, no weights
        cli.load_model(str(tmp_path))


def test_eval_in_bfloat16_with_an_expert(experts, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--task", "arith", *MODEL, "--n", "2", "--expert",
                     str(experts[0]), "--dtype", "bfloat16", "--attn", "eager", "--json",
                     str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 2


def test_help_shows_defaults(capsys):
    want = {"train": ["--steps STEPS optimisation steps (default: 200)",
                      "(default: 0.002)", "--device DEVICE"],
            "eval": ["(default: 500)", "rows per generation call (default: 128)",
                     "(default: float32)"],
            "adapt": ["(default: prompt)", "CEM generations (default: 20)"],
            "serve": ["(experts loaded at once; fixed for the model's life) (default: 8)",
                      "(default: 127.0.0.1)"]}
    for cmd, texts in want.items():
        assert cli.main([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for t in texts:
            assert t in text, (cmd, t)
        assert "(default: None)" not in text and "(default: False)" not in text
        # a flag is off unless given, whatever the default of the field it sets
        assert "(default: True)" not in text, cmd


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_only(experts, monkeypatch, capsys):
    """eval and adapt draw bars on stderr when it is a terminal, and nothing otherwise."""
    cem = ["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "cem", "--task",
           "arith_chain", "--n", "2", "--shots", "1", "--cem-iterations", "2",
           "--cem-population", "2"]
    ev = ["eval", "--task", "arith", *MODEL, "--n", "4", "--batch-size", "2"]
    assert cli.main(ev) == 0 and cli.main(cem) == 0
    assert "eval arith" not in capsys.readouterr().err
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert cli.main(ev) == 0
    assert "eval arith" in term.getvalue() and "4/4" in term.getvalue()
    assert cli.main(cem) == 0
    assert "cem: 100%" in term.getvalue() and "2/2" in term.getvalue()
    assert "pass 2" in term.getvalue()


def test_train_warns_when_no_step_beat_the_start(tmp_path, capsys, monkeypatch):
    from t2fast.train import Trainer
    from t2fast.train.trainer import TrainResult
    args = ["train", "--task", "arith", "--out", str(tmp_path / "e.safetensors"), *MODEL,
            "--steps", "1", "--batch-size", "2", "--samples-per-prompt", "2", "--eval-n", "2",
            "--no-cache", "--no-progress"]
    for best_step, warned in ((0, True), (1, False)):
        monkeypatch.setattr(Trainer, "train", lambda self: TrainResult(
            0.5, best_step, 1, False, self.config.out, 10, 0.1))
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        assert ("warning: no step beat the starting point" in err) is warned, err
        assert ("holds the untrained start" in err) is warned


def test_serve_passes_vllm_options_with_their_values(monkeypatch):
    """``--max-model-len 512 tiny``: 512 is the option's value, tiny the model."""
    import argparse
    from t2fast.serve.cli import split_vllm_options
    vllm = argparse.ArgumentParser()
    vllm.add_argument("--max-model-len")
    vllm.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction)
    vllm.add_argument("--served-model-name", nargs="+")
    vllm.add_argument("--port")                 # t2fast's own option wins
    argv = ["--max-model-len", "512", "tiny", "--enforce-eager", "--max-experts", "4",
            "--max_model_len=256", "--served-model-name", "a", "b", "--port", "8300",
            "--unknown-option", "x"]
    own, passed = split_vllm_options(argv, vllm)
    assert own == ["tiny", "--max-experts", "4", "--port", "8300", "--unknown-option", "x"]
    assert passed == ["--max-model-len", "512", "--enforce-eager", "--max_model_len=256",
                      "--served-model-name", "a", "b"]
    import t2fast.serve.cli as serve_cli

    def no_vllm():
        raise ImportError("No module named 'vllm'")
    monkeypatch.setattr(serve_cli, "vllm_parser", no_vllm)
    assert split_vllm_options(argv) == (argv, [])      # left to serve, which says vLLM is missing


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_command_line_with_vllm_options_before_the_model(monkeypatch):
    pytest.importorskip("vllm")
    seen = []
    monkeypatch.setattr(cli.SUBCOMMANDS["serve"], "run",
                        lambda args: seen.append((args.model, args.max_experts, args._extra)))
    cli.main(["serve", "--max-model-len", "512", "--dtype", "bfloat16", "tiny",
              "--max-experts", "2", "--enforce-eager"])
    assert seen == [("tiny", 2, ["--max-model-len", "512", "--dtype", "bfloat16",
                                 "--enforce-eager"])]


def test_layers_and_targets_parsing():
    assert cli.parse_layers("0:2") == (0, 2)
    assert cli.parse_layers("1,3") == [1, 3]
    assert cli.parse_layers("2") == 2
    assert cli.parse_layers("second_half") == "second_half"
    assert cli.parse_layers(None) is None
    assert cli.parse_targets("mlp") == "mlp"
    assert cli.parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]


def test_registry(capsys):
    calls = []
    cli.register("hello-test", "say hello", lambda p: p.add_argument("--name", default="x"),
                 lambda a: calls.append(a.name) or 0)
    try:
        with pytest.raises(ValueError, match="already registered"):
            cli.register("hello-test", "again", lambda p: None, lambda a: 0)
        assert cli.main(["hello-test", "--name", "t2"]) == 0
        assert calls == ["t2"]
        assert {"train", "eval", "adapt"} <= set(cli.SUBCOMMANDS)
        cli.register("hello-test", "exit", lambda p: None, lambda a: sys.exit("boom"),
                     replace=True)
        assert cli.main(["hello-test"]) == 1 and "boom" in capsys.readouterr().err
    finally:
        cli.SUBCOMMANDS.pop("hello-test")


def test_eval_and_adapt_take_allow_other_model(capsys):
    """An expert of the bundled model on the second base model (same shapes, another seed):
    refused with the flag that allows it named, then evaluated with that flag."""
    root = pathlib.Path(__file__).resolve().parent.parent
    other = str(root / "results" / "second_base")
    expert = str(root / "experts" / "arith.safetensors")
    ev = ["eval", "--model", other, "--task", "arith", "--n", "2", "--threads", "1",
          "--expert", expert]
    assert cli.main(ev) == 2
    assert "--allow-other-model" in capsys.readouterr().err
    assert cli.main([*ev, "--allow-other-model"]) == 0
    ad = ["adapt", "--model", other, "--task", "arith", "--n", "2", "--threads", "1",
          "--experts", expert, "--strategy", "uniform"]
    assert cli.main(ad) == 2 and "--allow-other-model" in capsys.readouterr().err
    assert cli.main([*ad, "--allow-other-model"]) == 0


def test_adapt_prompt_strategy_takes_the_paper_template(experts, capsys, monkeypatch):
    """``--adapt-template paper`` lists the experts' names as categories in pass 1 (chat
    models); it only phrases the prompt strategy."""
    from t2fast.adapt import prompt as prompt_module

    seen = []
    real = prompt_module.PROMPT_TEMPLATES["paper"]
    monkeypatch.setitem(prompt_module.PROMPT_TEMPLATES, "paper",
                        lambda p, labels: seen.append(list(labels)) or real(p, labels))
    ad = ["adapt", *MODEL, "--experts", *map(str, experts), "--task", "arith", "--n", "2"]
    assert cli.main([*ad, "--adapt-template", "paper"]) == 0
    assert seen and all(labels == ["arith", "strings"] for labels in seen)
    assert cli.main([*ad, "--strategy", "uniform", "--adapt-template", "paper"]) == 2
    assert "--adapt-template" in capsys.readouterr().err


def test_eval_names_an_expert_made_for_another_model(experts, capsys):
    """An expert of a 1-layer model on the bundled 4-layer one adapts matrices the model has,
    but one of the bundled model's on a 1-layer model does not: the error says so."""
    root = pathlib.Path(__file__).resolve().parent.parent
    rc = cli.main(["eval", *MODEL, "--task", "arith", "--n", "2",
                   "--expert", str(root / "experts" / "arith.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "of which are not linear modules of this model" in err, err
    assert "made for another model" in err


def _gsm8k_file(path, n):
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i + 1}?",
                                        "answer": f"#### {2 * i + 1}"}) + "\n" for i in range(n)))
    return path


def test_a_split_the_data_lacks_is_named_with_how_splits_are_made(tmp_path, capsys):
    """``eval`` on a file taken whole as its train split (default --split test) said only
    that --n asked for more; ``train`` on it validated on nothing and kept the untrained
    start; a --train-n beyond the pool was a RuntimeError traceback."""
    data = _gsm8k_file(tmp_path / "g.jsonl", 12)
    assert cli.main(["eval", "--task", f"gsm8k@train:{data}", "--model", "random"]) == 2
    assert "has 0 distinct test examples: it is one file taken whole as its train split " \
           "(KIND@train:FILE)" in capsys.readouterr().err
    assert cli.main(["eval", "--task", f"gsm8k:{data}", "--model", "random", "--n", "5"]) == 2
    assert "KIND:FILE divides a file's records 80/10/10" in capsys.readouterr().err
    common = ["--model", "random", "--threads", "1", "--steps", "1", "--batch-size", "2",
              "--samples-per-prompt", "2", "--no-progress", "--no-cache"]
    out = tmp_path / "g.safetensors"
    assert cli.main(["train", "--task", f"gsm8k@train:{data}", "--out", str(out), *common]) == 2
    err = capsys.readouterr().err
    assert "eval_n 128: 128 examples asked for, but task 'gsm8k' has 0 distinct validation " \
           "examples" in err and "the trainer keeps the step that scores best" in err
    assert not out.exists()
    assert cli.main(["train", "--task", "arith", "--train-n", "5000", "--out", str(out),
                     *common]) == 2
    assert "train_n 5000: 5000 examples asked for, but task 'arith' has 4675 distinct train " \
           "examples" in capsys.readouterr().err


def test_the_expert_is_named_after_the_whole_file_name(tmp_path):
    out = tmp_path / "arith_kl0.2.safetensors"
    assert cli.main(["train", "--task", "arith", "--out", str(out), "--model", "random",
                     "--threads", "1", "--steps", "1", "--batch-size", "2",
                     "--samples-per-prompt", "2", "--eval-n", "2", "--eval-every", "1",
                     "--no-progress", "--no-cache"]) == 0
    assert load_expert(out).name == "arith_kl0.2"       # before: arith_kl0
    log = pathlib.Path(f"{out}.log.jsonl")
    runs = [json.loads(line)["event"] for line in log.read_text().splitlines()].count("config")
    assert cli.main(["train", "--task", "arith", "--out", str(out), "--model", "random",
                     "--threads", "1", "--steps", "1", "--batch-size", "2",
                     "--samples-per-prompt", "2", "--eval-n", "2", "--eval-every", "1",
                     "--no-progress", "--no-cache"]) == 0
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()].count(
        "config") == runs == 1                          # a new run starts its log anew


def test_fewer_validation_examples_than_eval_n_are_used_with_a_warning(tmp_path):
    data = _gsm8k_file(tmp_path / "g.jsonl", 40)
    with pytest.warns(UserWarning, match=r"eval_n 128: 128 examples asked for, but task 'gsm8k' "
                                         r"has \d distinct validation examples .*validating on "
                                         r"those \d"):
        assert cli.main(["train", "--task", f"gsm8k:{data}", "--out",
                         str(tmp_path / "g.safetensors"), "--model", "random", "--threads", "1",
                         "--steps", "1", "--batch-size", "2", "--samples-per-prompt", "2",
                         "--no-progress", "--no-cache"]) == 0


def test_train_refuses_files_that_would_destroy_each_other_or_an_earlier_run(
        tmp_path, capsys, no_model):
    """--log or --checkpoint on --out (the expert was overwritten or appended to); a new run
    where an earlier one left its checkpoint (its log and expert were restarted silently)."""
    out = tmp_path / "e.safetensors"
    train = ["train", "--task", "arith", "--out", str(out), *MODEL]
    err = _usage_error(capsys, [*train, "--log", str(out)], "--log")
    assert "the same file as out" in err
    _usage_error(capsys, [*train, "--checkpoint", str(out)], "--checkpoint")
    _usage_error(capsys, [*train, "--log", str(tmp_path / "x"), "--checkpoint",
                          str(tmp_path / "x")], "--checkpoint")
    pathlib.Path(f"{out}.state.pt").write_bytes(b"")
    err = _usage_error(capsys, train, "--resume")
    assert "holds the checkpoint of an unfinished run into" in err and "that t2fast cannot " \
        "read" in err and "with resume (--resume)" in err
    _usage_error(capsys, [*train, "--checkpoint", str(tmp_path / "c.pt"), "--resume"],
                 "--resume")


def test_train_refuses_options_of_another_objective_or_method(tmp_path, capsys, no_model):
    train = ["train", "--task", "arith", "--out", str(tmp_path / "e.safetensors"), *MODEL]
    for given, option, why in (
            (["--objective", "sft", "--kl-coef", "0.5"], "--kl-coef", "--objective rl only"),
            (["--objective", "sft", "--temp", "0.3"], "--temperature", "--objective rl only"),
            (["--objective", "sft", "--log-kl"], "--log-kl", "(the objective here is sft)"),
            (["--lora-rank", "16"], "--lora-rank", "--method lora only"),
            (["--official-init", "0.5"], "--official-init", "--parameterization official")):
        assert why in _usage_error(capsys, [*train, *given], option)
    # SFT draws no samples, so the RL baseline's need of two is no reason to refuse it
    assert cli.main([*train, "--objective", "sft", "--samples-per-prompt", "1"]) == 2
    assert "argument --samples-per-prompt: applies to --objective rl" in capsys.readouterr().err


def test_train_says_what_the_data_lacks_before_loading_the_model(tmp_path, capsys, no_model):
    data = _gsm8k_file(tmp_path / "g.jsonl", 12)
    err = _usage_error(capsys, ["train", "--task", f"gsm8k@validation:{data}", "--out",
                                str(tmp_path / "g.safetensors"), *MODEL], "--batch-size")
    assert "has 0 distinct train examples: it is one file taken whole as its validation " \
           "split" in err


def test_sft_refuses_examples_without_a_reference_answer(monkeypatch):
    from t2fast.tasks import get_task
    from t2fast.train import TrainConfig
    from t2fast.train.config import ConfigError
    from t2fast.train.trainer import run_examples

    task = get_task("arith")
    blank = [dataclasses.replace(e, answer=" ") for e in task.examples("train", 40)]
    monkeypatch.setattr(type(task), "examples", lambda self, split, n=None: blank)
    with pytest.raises(ConfigError, match=r"objective='sft': 40 of the 40 training examples "
                                          r"of task 'arith' have no reference answer"):
        run_examples(task, TrainConfig(objective="sft", batch_size=4, train_n=None))
    assert len(run_examples(task, TrainConfig(batch_size=4, train_n=None))[0]) == 40


def test_lora_writes_beside_the_user_files_only_into_an_adapter_folder(tmp_path, capsys):
    """--out FOLDER/ with a trailing separator: the log and checkpoint lie beside the folder
    (they were hidden files in it); a folder of other files is refused (PEFT's model card
    replaced the user's README.md)."""
    pytest.importorskip("peft")
    mine = tmp_path / "proj"
    mine.mkdir()
    (mine / "README.md").write_text("notes")
    lora = ["train", "--task", "arith", "--method", "lora", *MODEL, "--steps", "1",
            "--batch-size", "2", "--samples-per-prompt", "2", "--eval-n", "2", "--no-progress",
            "--no-cache"]
    assert "a folder of other files" in _usage_error(capsys, [*lora, "--out", str(mine)],
                                                     "--out")
    assert (mine / "README.md").read_text() == "notes"
    assert cli.main([*lora, "--out", str(tmp_path / "ad") + os.sep]) == 0
    assert (tmp_path / "ad.log.jsonl").exists() and not (tmp_path / "ad" / ".log.jsonl").exists()
    (tmp_path / "ad" / "README.md").write_text("mine")   # an adapter folder's own notes stay
    assert cli.main([*lora, "--out", str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "README.md").read_text() == "mine"


def test_an_interrupted_train_keeps_its_checkpoint_and_says_how_to_resume(tmp_path, capsys,
                                                                           monkeypatch):
    from t2fast.train import Trainer

    step = Trainer._step

    def interrupting(self, bar):
        step(self, bar)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Trainer, "_step", interrupting)
    out = tmp_path / "e.safetensors"
    train = ["train", "--task", "arith", "--out", str(out), *MODEL, "--steps", "3",
             "--batch-size", "2", "--samples-per-prompt", "2", "--eval-n", "2", "--no-progress",
             "--no-cache"]
    assert cli.main(train) == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step" in err
    assert "interrupted after step 1 of 3" in err and "the same command with --resume" in err
    assert pathlib.Path(f"{out}.state.pt").exists() and out.exists()
    monkeypatch.setattr(Trainer, "_step", step)
    assert cli.main([*train, "--resume"]) == 0
    assert not pathlib.Path(f"{out}.state.pt").exists()


def test_adapt_cem_options_reach_the_search_and_the_summary(experts, tmp_path, capsys,
                                                             monkeypatch):
    """--max-new-tokens is the shots' budget too; the JSON says what ran; the shots and the
    questions asked never overlap; a --seed past the shot blocks is named."""
    import t2fast.adapt
    seen = []
    real = t2fast.adapt.fewshot_cem
    monkeypatch.setattr(t2fast.adapt, "fewshot_cem",
                        lambda *a, **kw: seen.append(kw["max_new_tokens"]) or real(*a, **kw))
    out = tmp_path / "c.json"
    cem = ["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "cem", "--task",
           "arith", "--n", "2", "--shots", "2", "--cem-iterations", "1", "--cem-population",
           "2"]
    assert cli.main([*cem, "--max-new-tokens", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert seen == [3] and r["max_new_tokens"] == 3
    assert r["split"] == "test" and r["model"] == "random:0:1" and r["classifier"] is None
    assert r["cem_config"]["iterations"] == 1 and r["cem_config"]["space"] == "residual"
    err = _usage_error(capsys, [*cem, "--split", "validation"], "--split")
    assert "validation holds cem's shots (validation examples 0-1), which the 2 questions " \
           "asked would include; use --split test, or --shot-set 1 or later" in err
    assert cli.main([*cem, "--split", "validation", "--shot-set", "1"]) == 0
    err = _usage_error(capsys, [*cem, "--shots", "20", "--seed", "30"], "--seed")
    assert "cem's shots are block 30 (--shot-set, default --seed) of --shots 20" in err


def test_adapt_refuses_a_classifier_of_other_matrices_and_paper_restatement(
        experts, tmp_path, capsys, no_model):
    from t2fast.experts import Expert
    full = load_expert(experts[0])
    mlp = tmp_path / "mlp.safetensors"
    Expert("mlp", {n: z for n, z in full.z.items() if "mlp" in n}, full.base_model,
           full.fingerprint).save(mlp)
    err = _usage_error(capsys, ["adapt", *MODEL, "--experts", str(mlp), "--strategy",
                                "classifier", "--classifier", str(experts[1]), "--task", "arith"],
                       "--classifier")
    assert "adapts 7 matrices and the --experts 3, not the same ones" in err
    err = _usage_error(capsys, ["adapt", *MODEL, "--experts", *map(str, experts), "--restate",
                                "--adapt-template", "paper", "--task", "arith"], "--restate")
    assert "needs --adapt-template tiny" in err


def test_the_paper_template_asks_the_bare_question():
    from t2fast.adapt.prompt import paper_style_prompt
    for prompt in ("Q: What is 2+2?\nA: ", "What is 2+2?"):
        assert paper_style_prompt(prompt, ["math"]).endswith("Question: What is 2+2?\nCategory:")


def test_shipped_experts_are_named_by_their_names(capsys):
    """An installed wheel keeps the experts inside the package: the command line finds them
    by name (a path that exists still wins), and an unknown one lists them."""
    from t2fast.cli_types import expert_path
    from t2fast.models import tiny_experts
    from t2fast.serve.cli import expert_entry

    shipped = tiny_experts()
    parse = expert_path()
    assert parse("arith") == str(shipped["arith"])
    assert expert_entry("classify") == str(shipped["classify"])
    assert expert_entry("math=arith") == f"math={shipped['arith']}"
    with pytest.raises(argparse.ArgumentTypeError, match="or the name of a shipped expert: "
                                                         "arith, choice, classify, strings"):
        parse("algebra")
    assert cli.main(["eval", "--task", "arith", "--n", "2", "--expert", "arith",
                     "--threads", "1"]) == 0


def test_demo_and_tiny_experts_outside_a_checkout(monkeypatch, tmp_path):
    """Installed without its experts, the demo uses stand-ins (it raised), and nothing is
    looked up in the folder above the package unless that folder is the project."""
    import t2fast.models.tiny as tiny
    from t2fast import demo
    monkeypatch.setattr(tiny, "_EXPERT_DIRS", (tmp_path / "none",))
    with pytest.raises(FileNotFoundError, match="no shipped experts"):
        tiny.tiny_experts()
    assert (tiny._CHECKOUT / "pyproject.toml").is_file()     # this test runs in a checkout
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors in .*none$"):
        tiny.load_tiny(path=tmp_path / "none")
    monkeypatch.setattr(demo, "tiny_experts", tiny.tiny_experts)

    class Handle:
        class decomposition:
            factors = {}
        def new_expert(self, name, z):
            return name
    experts, origin = demo._experts_for(Handle(), ["arith"])
    assert experts == ["arith"] and origin["arith"].startswith("random stand-in")
