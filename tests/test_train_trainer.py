"""The training loop: the reward rises on a toy task, best checkpoint, early stopping, resume,
logs, the SFT objective and the LoRA baseline."""
import json
import os
import signal

import pytest
import torch

from t2fast.experts import load_expert
from t2fast.models import build_char_tokenizer, random_tiny_llama
from t2fast.tasks.base import ScoreResult, Task
from t2fast.train import TrainConfig, Trainer, train
from t2fast.train.config import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


class DigitTask(Task):
    """Toy task: any answer whose first character is a digit is correct."""
    name = "toy_digit"

    def sample(self, rng):
        return "".join(rng.choice("abcdefgh") for _ in range(4)), "7", {}

    def score(self, generation, example):
        c = generation[:1]
        return ScoreResult(correct=c.isdigit(), parsable=bool(c), extracted=c)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def small_model(seed=0):
    return random_tiny_llama(seed, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2,
                             initializer_range=0.1)


def toy_config(tmp_path, **kw):
    base = dict(task="toy_digit", train_n=256, steps=40, batch_size=16, samples_per_prompt=4,
                lr=0.3, max_new_tokens=1, eval_every=0, eval_n=32, progress=False,
                cache_dir=False, grad_clip=0.0, out=str(tmp_path / "toy.safetensors"),
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def steps_of(path):
    return [json.loads(l) for l in open(path) if json.loads(l).get("event") == "step"]


def test_reward_rises_on_toy_task(tmp_path, tok):
    cfg = toy_config(tmp_path)
    res = train(cfg, small_model(), tok, task=DigitTask())
    rewards = [s["reward"] for s in steps_of(cfg.log_path)]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert last > first + 0.5, (first, last)
    assert res.best_score > res.evals[0]["accuracy"]
    # the best checkpoint is a loadable expert with the training metadata
    e = load_expert(cfg.out)
    assert e.extra["task"] == "toy_digit" and e.extra["best_step"] == res.best_step
    assert e.extra["num_parameters"] == res.num_parameters == sum(v.numel() for v in e.z.values())
    # shipped metadata holds the recipe, not this run's file locations
    assert "log" not in e.extra["config"] and "out" not in e.extra["config"]
    assert e.extra["config"]["lr"] == 0.3 and e.extra["config"]["seed"] == 0


def test_portable_names_and_config():
    from t2fast.train.policy import portable_model_name
    from t2fast.train.trainer import portable_config
    assert portable_model_name("/some/where/tiny_llama") == "tiny_llama"
    assert portable_model_name("org/model-7b") == "org/model-7b"
    cfg = TrainConfig(task="arith", log="/x/y.jsonl", out="e/a.safetensors",
                      extra={"command": "t2fast train --task arith --log /x/y.jsonl "
                                        "--checkpoint=/x/s.pt --lr 0.1"})
    d = portable_config(cfg)
    assert d["extra"]["command"] == "t2fast train --task arith --lr 0.1"
    assert "log" not in d and d["lr"] == 2e-3


def test_official_parameterization_and_kl_also_learn(tmp_path, tok):
    cfg = toy_config(tmp_path, parameterization="official", lr=1.0, kl_coef=0.01, steps=30,
                     baseline="mean")
    train(cfg, small_model(), tok, task=DigitTask())
    recs = steps_of(cfg.log_path)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)   # starts at the base model
    assert recs[-1]["kl"] > 0
    assert sum(r["reward"] for r in recs[-10:]) / 10 > sum(r["reward"] for r in recs[:5]) / 5
    # the saved expert is the effective z (rescaled): Σσz = Σσ per matrix is checked in
    # test_train_policy; here only that it is not the identity any more
    z = load_expert(cfg.out).z
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in z.values())


def test_cosine_schedule_and_clipping(tmp_path, tok):
    cfg = toy_config(tmp_path, steps=6, lr=0.1, warmup_steps=2, min_lr_ratio=0.1, grad_clip=0.5)
    tr = Trainer(cfg, small_model(), tok, task=DigitTask())
    assert [round(tr.lr_factor(s), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318]
    tr.train()
    lrs = [s["lr"] for s in steps_of(cfg.log_path)]
    assert lrs == pytest.approx([0.1 * tr.lr_factor(s) for s in range(6)])


def test_resume_continues_exactly(tmp_path, tok):
    full = toy_config(tmp_path / "a", steps=6, eval_every=3)
    train(full, small_model(), tok, task=DigitTask())
    z_full = load_expert(full.out).z
    # a run stopped after 3 steps, then resumed with the same configuration
    part = toy_config(tmp_path / "b", steps=6, eval_every=3)
    tr = Trainer(part, small_model(), tok, task=DigitTask())
    assert tr.train(stop_after=4).steps_run == 4
    assert part.checkpoint_path.exists()
    part.resume = True
    part.steps = 6
    res = train(part, small_model(), tok, task=DigitTask())
    assert res.steps_run == 6
    a = [s["reward"] for s in steps_of(full.log_path)]
    b = [s["reward"] for s in steps_of(part.log_path)]
    assert a == b
    z_part = load_expert(part.out).z
    assert all(torch.allclose(z_full[n], z_part[n]) for n in z_full)


def test_resume_checks_configuration(tmp_path, tok):
    cfg = toy_config(tmp_path, steps=2)
    train(cfg, small_model(), tok, task=DigitTask())
    # the recipe may not change (the optimizer state would silently keep the old lr, the best
    # score would compare other validation sets ...); the length and the bookkeeping may
    for change in ({"batch_size": 8}, {"lr": 0.5}, {"kl_coef": 0.0}, {"eval_n": 3}):
        other = toy_config(tmp_path, steps=4, resume=True, **change)
        with pytest.raises(ValueError, match=f"another recipe \\({next(iter(change))}: "):
            train(other, small_model(), tok, task=DigitTask())
    with pytest.raises(ValueError, match="trained on another base model: the singular values"):
        train(toy_config(tmp_path, steps=4, resume=True), small_model(seed=1), tok,
              task=DigitTask())
    assert train(toy_config(tmp_path, steps=4, resume=True, patience=3, progress=False),
                 small_model(), tok, task=DigitTask()).steps_run == 4
    # a new run may replace a finished run's checkpoint, not restart an unfinished one
    Trainer(toy_config(tmp_path, steps=2), small_model(), tok, task=DigitTask()).train(
        stop_after=1)
    with pytest.raises(ConfigError, match=r"resume=False: .* holds the checkpoint of an "
                                          r"unfinished run into .* \(step 1 of 2\)"):
        Trainer(toy_config(tmp_path, steps=2), small_model(), tok, task=DigitTask())
    missing = toy_config(tmp_path / "none", steps=2, resume=True)
    with pytest.raises(ConfigError, match="resume=True: there is no checkpoint"):
        train(missing, small_model(), tok, task=DigitTask())


def test_an_interrupted_run_stops_after_a_step_and_resumes_where_it_stopped(tmp_path, tok,
                                                                           monkeypatch):
    """Ctrl-C (SIGINT) or SIGTERM: the step in progress ends, the checkpoint is written, and
    a resumed run logs each step once (the log loses the steps the checkpoint lacks)."""
    full = toy_config(tmp_path / "a", steps=6, eval_every=3)
    train(full, small_model(), tok, task=DigitTask())
    part = toy_config(tmp_path / "b", steps=6, eval_every=3)
    step = Trainer._step

    def interrupting(self, bar):
        step(self, bar)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(Trainer, "_step", interrupting)
    res = train(part, small_model(), tok, task=DigitTask())
    assert res.interrupted and res.steps_run == 4 and part.checkpoint_path.exists()
    monkeypatch.setattr(Trainer, "_step", step)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handlers are put back
    # a step logged after the last checkpoint, then the half-written line of a killed run
    with part.log_path.open("a") as f:
        f.write(json.dumps({"event": "step", "step": 5, "reward": 9.0}) + '\n{"event": "st')
    part.resume = True
    assert not train(part, small_model(), tok, task=DigitTask()).interrupted
    assert [s["reward"] for s in steps_of(part.log_path)] == \
        [s["reward"] for s in steps_of(full.log_path)]


def test_signals_the_process_ignores_stay_ignored():
    """Under nohup or in a background job SIGINT is ignored: a Ctrl-C meant for the shell
    does not stop the training; SIGTERM still asks it to stop."""
    from t2fast.train.trainer import stop_requests

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_requests() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


def test_early_stopping_keeps_best(tmp_path, tok):
    # lr 0: nothing changes, so validation never improves on step 0
    cfg = toy_config(tmp_path, steps=50, lr=1e-12, eval_every=2, patience=2)
    res = train(cfg, small_model(), tok, task=DigitTask())
    assert res.stopped_early and res.steps_run == 4 and res.best_step == 0
    evals = [json.loads(l) for l in open(cfg.log_path) if json.loads(l).get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]


def test_sft_objective_lowers_loss(tmp_path, tok):
    cfg = toy_config(tmp_path, objective="sft", steps=15, lr=0.1)
    train(cfg, small_model(), tok, task=DigitTask())
    losses = [s["loss"] for s in steps_of(cfg.log_path)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("objective", ["rl", "sft"])
def test_lora_baseline(tmp_path, tok, objective):
    pytest.importorskip("peft")
    cfg = toy_config(tmp_path, method="lora", objective=objective, lora_rank=2, steps=4, lr=0.01,
                     out=str(tmp_path / "lora"), kl_coef=0.1)
    res = train(cfg, small_model(), tok, task=DigitTask())
    # 7 matrices of one layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128
    assert res.num_parameters == 2 * (2 * 128 + 2 * 96 + 3 * 192)
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert not (tmp_path / "lora" / "README.md").exists()
    meta = json.loads((tmp_path / "lora" / "t2fast_meta.json").read_text())
    assert meta["extra"]["config"]["method"] == "lora" and "log" not in meta["extra"]["config"]
    assert len(steps_of(cfg.log_path)) == 4


@pytest.mark.parametrize("targets,layers,expected", [
    ("mlp", None, 2 * 3 * 64),                  # 2 layers × gate, up, down (rank 64 each)
    ("attention", None, 2 * (64 + 32 + 32 + 64)),  # 2 layers × q, k, v, o
    (["q_proj", "down_proj"], None, 2 * 128),
    ("all", (1, 2), 64 + 32 + 32 + 64 + 3 * 64),
])
def test_target_selection(tmp_path, tok, targets, layers, expected):
    model = random_tiny_llama(0, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2)
    cfg = toy_config(tmp_path, targets=targets, layers=layers, steps=1)
    tr = Trainer(cfg, model, tok, task=DigitTask())
    assert tr.policy.num_parameters() == expected
    tr.train()
    assert set(load_expert(cfg.out).z) == set(tr.policy.handle.modules)
    if layers is not None:
        assert all(".layers.1." in n for n in tr.policy.handle.modules)


def test_trainable_state_is_float32_under_a_bf16_default_dtype(tmp_path, tok):
    """Loading code for large models often sets a bf16 default dtype: z, its updates and the
    rewards stay float32 (a bf16 z near 1 rounds away AdamW steps below 2^-8)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for kind in ("plain", "official"):
            tr = Trainer(toy_config(tmp_path, steps=2, parameterization=kind),
                         small_model().float(), tok, task=DigitTask())
            assert {p.dtype for p in tr.policy.parameters()} == {torch.float32}, kind
            before = torch.cat([p.detach().clone() for p in tr.policy.parameters()])
            tr.rl_step(tr.batch_examples(tr.step))
            after = torch.cat([p.detach() for p in tr.policy.parameters()])
            assert after.dtype == torch.float32 and after.unique().numel() > 100, kind
            assert not torch.equal(before, after)
    finally:
        torch.set_default_dtype(old)


def test_tensorboard_missing_is_said_not_ignored(tmp_path, monkeypatch):
    import sys

    from t2fast.train.trainer import JSONLLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(RuntimeWarning, match=r"no TensorBoard logs in .*pip install tensorboard"):
        logger = JSONLLogger(tmp_path / "log.jsonl", str(tmp_path / "tb"))
    logger.log({"step": 1, "reward": 0.5})
    assert json.loads((tmp_path / "log.jsonl").read_text())["reward"] == 0.5
