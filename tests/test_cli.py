"""The t2fast command line: train / eval / adapt on a random tiny model, errors, the registry."""
import json

import pytest

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
def test_adapt_strategies(experts, tmp_path, strategy):
    out = tmp_path / "a.json"
    extra = ["--classifier", str(experts[1])] if strategy == "classifier" else []
    profile = tmp_path / "profile.json"
    if strategy == "cem":
        extra = ["--save-profile", str(profile)]
    experts_arg = [str(experts[0])] if strategy == "classifier" else [str(p) for p in experts]
    args = ["adapt", *MODEL, "--experts", *experts_arg, "--strategy", strategy, "--task",
            "arith_chain", "--n", "4", "--shots", "2", "--cem-iterations", "1",
            "--cem-population", "3", "--json", str(out), *extra]
    assert cli.main(args) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 4 and r["pass2_s"] > 0
    if strategy == "cem":
        assert len(r["cem"]["alpha"]) == 2 and r["shot_set"] == 0
        from t2fast.serve.profiles import load_profile
        assert list(load_profile(profile).values()) == r["cem"]["alpha"]  # by expert name
    if strategy in ("prompt", "classifier"):
        assert sum(r["pass1_labels"].values()) == 4


def test_adapt_defaults_and_cem_shot_set(experts, tmp_path, monkeypatch):
    """--n defaults to 500 (the results table's size); cem's few-shot examples are block
    --shot-set (default: --seed) of the validation split."""
    from t2fast.adapt import fewshot_examples
    from t2fast.tasks import get_task
    args = cli.build_parser().parse_args(["adapt", "--experts", "x", "--task", "arith"])
    assert args.n == 500 and args.shot_set is None
    seen = []
    import t2fast.adapt
    real = t2fast.adapt.fewshot_cem
    monkeypatch.setattr(t2fast.adapt, "fewshot_cem",
                        lambda h, t, task, shots, cfg: seen.append((shots, cfg.seed)) or
                        real(h, t, task, shots, cfg))
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


def test_adapt_on_prompts(experts, capsys):
    assert cli.main(["adapt", *MODEL, "--experts", *map(str, experts), "--strategy", "prompt",
                     "--prompt", "1+2=?", "reverse('ab')"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [l["prompt"] for l in lines] == ["Q: 1+2=?\nA: ", "Q: reverse('ab')\nA: "]


def test_errors(experts, tmp_path, capsys):
    assert cli.main(["train", "--task", "nope", "--out", str(tmp_path / "x.safetensors"),
                     *MODEL]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["train", "--task", "arith", "--out", str(tmp_path / "x.safetensors"),
                     "--lr", "-1", *MODEL]) == 2
    assert "TrainConfig.lr" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "nope", *MODEL]) == 2
    for n in ("0", "-3"):            # rejected before any model is loaded
        assert cli.main(["eval", "--task", "arith", "--model", str(tmp_path / "absent"),
                         "--n", n]) == 2
        assert f"--n {n}: expected at least 1" in capsys.readouterr().err
        assert cli.main(["adapt", "--model", str(tmp_path / "absent"), "--experts",
                         str(experts[0]), "--task", "arith", "--n", n]) == 2
        assert f"--n {n}: expected at least 1" in capsys.readouterr().err
    assert cli.main(["adapt", *MODEL, "--experts", str(experts[0]), "--strategy", "magic",
                     "--task", "arith"]) == 2
    assert "unknown --strategy" in capsys.readouterr().err
    assert cli.main(["adapt", *MODEL, "--experts", str(tmp_path / "missing.safetensors"),
                     "--task", "arith"]) == 2
    assert "error" in capsys.readouterr().err
    assert cli.main(["adapt", *MODEL, "--experts", str(experts[0]), "--strategy",
                     "classifier", "--task", "arith"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "arith", "--out", "x.safetensors", "--layers", "a:b"])
    assert cli.main([]) == 2


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
    finally:
        cli.SUBCOMMANDS.pop("hello-test")
