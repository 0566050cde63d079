"""The training loop: REINFORCE + KL (or SFT) for SVF experts and the LoRA baseline.

    from t2fast.train import TrainConfig, train
    result = train(TrainConfig(task="arith", out="experts/arith.safetensors", steps=200))

Each step draws ``batch_size`` prompts from the task's train split (a seeded shuffle per epoch),
samples ``samples_per_prompt`` completions per prompt at ``temperature`` with the current
parameters on the fast path (merged weights), scores them with the task's scorer (reward +1 / −1,
or the unparsable penalty), computes the base model's logits on the same tokens (original
weights), and takes one AdamW step on −J (see :mod:`t2fast.train.objectives`; log-probabilities
and KL at the sampling temperature, so the gradient is on-policy) with the learning rate on a
cosine schedule and the gradient norm clipped. Every ``eval_every`` steps (and at step 0 and the
end) greedy accuracy on the validation split decides the best checkpoint (written to ``out``)
and early stopping. The full state is checkpointed at every evaluation for ``resume``.
Sampling uses a generator seeded from (seed, step), so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..experts import Fingerprint
from ..generation import generate
from ..tasks import get_task
from ..tasks.base import first_examples
from .config import ConfigError, TrainConfig
from .evaluate import EvalResult, evaluate
from .objectives import advantages, reinforce_kl_loss, sft_loss
from .policy import make_policy
from .rollout import completion_logits, max_new_tokens_for, repeat_prompts, teacher_batch


def _record_step(line: str) -> float:
    """The step of a log line (-inf for a record of no step; +inf for a line that is no
    record, such as the half-written last line of a killed run)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else -math.inf


class JSONLLogger:
    """Appends one JSON object per line; mirrors scalars to TensorBoard when it is installed.
    ``fresh``: start the file anew (a new run; a resumed one appends to its log)."""

    def __init__(self, path: Path | None, tensorboard_dir: str | None = None,
                 fresh: bool = False):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.write_text("")
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(tensorboard_dir)
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken
                warnings.warn(f"no TensorBoard logs in {tensorboard_dir} ({type(exc).__name__}: "
                              f"{exc}; pip install tensorboard); the JSONL log is written",
                              RuntimeWarning, stacklevel=2)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self.tb is not None and "step" in record:
            prefix = record.get("event", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after ``step`` (a resumed run goes on from its
        checkpoint: the steps an interruption lost are run, and logged, again)."""
        if not (self.path and self.path.exists()):
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    best_score: float
    best_step: int
    steps_run: int
    stopped_early: bool
    out: str | None
    num_parameters: int
    wall_s: float
    evals: list[dict] = field(default_factory=list)
    #: stopped by Ctrl-C / SIGTERM after a whole step, checkpointed: continue with resume
    interrupted: bool = False


class _StopRequests:
    requested = False


@contextlib.contextmanager
def stop_requests():
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the
    step in progress, checkpointed (``.requested``); a second one stops at once
    (KeyboardInterrupt). Signals are left alone outside the main thread, and where ignored."""
    stop = _StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print(f"t2fast train: {signal.Signals(signum).name}: stopping after this step, with a "
              f"checkpoint to resume from (Ctrl-C again stops at once)", file=sys.stderr)

    # a signal the process ignores (SIGINT under nohup or in a background job) stays ignored
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    before = {sig: h for sig, h in before.items() if h is not signal.SIG_IGN}
    for sig in before:
        signal.signal(sig, ask)
    try:
        yield stop
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


_BOOKKEEPING = ("log", "checkpoint", "tensorboard", "resume", "progress", "threads", "cache_dir",
                "out")
_PATH_FLAGS = ("--log", "--checkpoint", "--tensorboard")


def portable_config(config: TrainConfig) -> dict:
    """The configuration as stored in a shipped expert: the recipe, without this run's file
    locations and bookkeeping (the command line keeps ``--out`` but drops ``--log`` etc.)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
    extra = dict(d.get("extra") or {})
    cmd = extra.get("command")
    if isinstance(cmd, str):
        words, out, skip = cmd.split(), [], False
        for w in words:
            if skip:
                skip = False
                continue
            if w in _PATH_FLAGS:
                skip = True
                continue
            if any(w.startswith(f + "=") for f in _PATH_FLAGS):
                continue
            out.append(w)
        extra["command"] = " ".join(out)
    d["extra"] = extra
    return d


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2 ** 63 - 1)


def _examples(task, split: str, n: int | None, field: str) -> list:
    """The task's examples of ``split``: ``n`` of them (None: the task's default), all there
    are when ``field`` is ``eval_n`` and the split has fewer (with a warning); ConfigError
    when the split is empty or ``train_n`` asks for more than it has."""
    if n is None:
        return task.examples(split)
    got = first_examples(task, split, n)
    if len(got) < n:
        why = task.shortfall(split, n, len(got))
        if field == "train_n" or not got:
            keeps = "; the trainer keeps the step that scores best on them" \
                if field == "eval_n" else ""
            raise ConfigError(f"{field} {n}: {why}{keeps}")
        warnings.warn(f"{field} {n}: {why}; validating on those {len(got)}", stacklevel=4)
    return got


def run_examples(task, config: TrainConfig) -> tuple[list, list]:
    """(training examples, validation examples) of a run: ConfigError, naming the option,
    when the training split has fewer than ``batch_size``, when the validation split is
    empty, or when SFT meets examples without a reference answer to learn."""
    train = _examples(task, "train", config.train_n, "train_n")
    if len(train) < config.batch_size:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size}: a step takes that "
                          f"many training examples: "
                          f"{task.shortfall('train', config.batch_size, len(train))}")
    if config.objective == "sft":
        empty = sum(not e.answer.strip() for e in train)
        if empty:
            raise ConfigError(f"TrainConfig.objective='sft': {empty} of the {len(train)} "
                              f"training examples of task {task.name!r} have no reference "
                              f"answer to learn (SFT would train toward empty answers); give "
                              f"answers in the data, or train with RL")
    return train, _examples(task, config.eval_split, config.eval_n, "eval_n")


#: What a resumed run may change: its length (the cosine decay is then spread over the new
#: total from the step it resumes at), its stopping rule and its bookkeeping; every other
#: field is the recipe, which the checkpoint's optimizer and best score belong to.
RESUMABLE = ("steps", "patience", "eval_every", "eval_batch_size", "out", "log", "checkpoint",
             "resume", "tensorboard", "progress", "threads", "cache_dir", "backend", "extra",
             "log_kl", "official_init")


class Trainer:
    """Runs one :class:`TrainConfig`. ``model``/``tokenizer`` default to the bundled tiny model."""

    def __init__(self, config: TrainConfig, model=None, tokenizer=None, init_z=None,
                 task=None):
        self.config = config.validate(check_task=task is None).check_files()
        if config.threads:
            torch.set_num_threads(config.threads)
        if (model is None) != (tokenizer is None):
            raise ConfigError("pass both model and tokenizer, or neither (bundled tiny model)")
        if model is None:
            from ..models import load_tiny
            model, tokenizer = load_tiny()
        self.tokenizer = tokenizer
        self.task = get_task(config.task) if task is None else task
        torch.manual_seed(config.seed)
        self.policy = make_policy(model, config, init_z=init_z)
        self.model = self.policy.model
        self.max_new_tokens = max_new_tokens_for(config.task, config.max_new_tokens)
        self.train_examples, self.eval_examples = run_examples(self.task, config)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr,
                                           betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step = 0
        self.best_score = -math.inf
        self.best_step = -1
        self.best_state = None
        self.evals_since_best = 0
        self.evals: list[dict] = []
        self.logger = JSONLLogger(config.log_path, config.tensorboard, fresh=not config.resume)

    # ---- schedule and data ------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay from 1 to ``min_lr_ratio`` at the last step."""
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        span = max(1, c.steps - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def batch_examples(self, step: int) -> list:
        """The prompts of ``step``: epochs of seeded shuffles of the training examples."""
        n, b = len(self.train_examples), self.config.batch_size
        per_epoch = n // b
        epoch, k = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        return [self.train_examples[i] for i in order[k * b:(k + 1) * b]]

    # ---- one step -----------------------------------------------------------------------
    def rl_step(self, examples) -> dict:
        c = self.config
        exs = repeat_prompts(examples, c.samples_per_prompt)
        gen = torch.Generator().manual_seed(_step_seed(c.seed, self.step))
        t0 = time.perf_counter()
        with self.policy.acting() as model:
            ro = generate(model, self.tokenizer, [e.prompt for e in exs],
                          max_new_tokens=self.max_new_tokens, do_sample=True,
                          temperature=c.temperature, top_k=c.top_k, generator=gen)
        t_roll = time.perf_counter() - t0
        scores = [self.task.score(t, e) for t, e in zip(ro.texts, exs)]
        rewards = torch.tensor([s.reward(c.unparsable_penalty) for s in scores],
                               dtype=torch.float32)
        adv = advantages(rewards, c.samples_per_prompt, c.baseline)
        base_logits = None
        if c.kl_coef > 0 or c.log_kl:
            with self.policy.reference() as model:
                base_logits = completion_logits(model, ro, c.samples_per_prompt)
        with self.policy.training() as model:
            logits = completion_logits(model, ro, c.samples_per_prompt)
        parts = reinforce_kl_loss(logits, base_logits, ro.completion_ids, ro.completion_mask,
                                  adv, c.kl_coef, c.logprob_reduction, c.temperature)
        stats = self._update(parts.loss)
        stats.update(parts.stats())
        stats.update(reward=float(rewards.mean()),
                     accuracy=sum(s.correct for s in scores) / len(scores),
                     parsable=sum(s.parsable for s in scores) / len(scores),
                     length=float(ro.completion_mask.sum(-1).mean()), rollout_s=t_roll)
        return stats

    def sft_step(self, examples) -> dict:
        batch = teacher_batch(self.tokenizer, [e.prompt for e in examples],
                              [e.answer for e in examples],
                              device=next(self.model.parameters()).device)
        with self.policy.training() as model:
            logits = completion_logits(model, batch)
        loss = sft_loss(logits, batch.completion_ids, batch.completion_mask)
        stats = self._update(loss)
        stats["loss"] = float(loss.detach())
        return stats

    def _update(self, loss: torch.Tensor) -> dict:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {float(loss)}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.policy.parameters()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"grad_norm": float(gnorm), "lr": lr}

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self, examples=None, base: bool = False) -> EvalResult:
        """Greedy accuracy of the current parameters (or of the base model) on ``examples``
        (default: the validation examples)."""
        examples = self.eval_examples if examples is None else examples
        ctx = self.policy.base() if base else self.policy.acting()
        with ctx as model:
            return evaluate(model, self.tokenizer, self.task, examples,
                            max_new_tokens=self.max_new_tokens,
                            batch_size=self.config.eval_batch_size)

    def _eval_and_keep_best(self) -> bool:
        """Evaluate; on a strict improvement save the expert. Returns whether it improved."""
        res = self.evaluate()
        improved = res.accuracy > self.best_score
        if improved:
            self.best_score, self.best_step = res.accuracy, self.step
            self.best_state = self.policy.state_dict()
            self.evals_since_best = 0
            self._save_best()
        else:
            self.evals_since_best += 1
        rec = {"event": "eval", "step": self.step, "split": self.config.eval_split,
               **{k: v for k, v in res.summary().items() if k != "task"},
               "best": self.best_score, "best_step": self.best_step, "improved": improved}
        self.evals.append(rec)
        self.logger.log(rec)
        return improved

    def _save_best(self) -> None:
        c = self.config
        if not c.out:
            return
        extra = {"task": c.task, "method": c.method, "objective": c.objective,
                 "parameterization": c.parameterization, "best_step": self.best_step,
                 f"{c.eval_split}_accuracy": self.best_score, "eval_n": len(self.eval_examples),
                 "num_parameters": self.policy.num_parameters(),
                 "config": portable_config(c)}
        Path(c.out).parent.mkdir(parents=True, exist_ok=True)
        self.policy.save(c.out, c.expert_name, extra)

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self, path=None) -> Path | None:
        path = Path(path) if path else self.config.checkpoint_path
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "policy": self.policy.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "best_score": self.best_score, "best_step": self.best_step,
                 "best_state": self.best_state, "evals_since_best": self.evals_since_best,
                 "evals_json": json.dumps(self.evals), "config_json": json.dumps(
                     self.config.to_dict()), "fingerprint_json": json.dumps(
                     fp.to_json() if (fp := self.policy.fingerprint) is not None else None)}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self, path=None) -> None:
        path = Path(path) if path else self.config.checkpoint_path
        if path is None or not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        old = json.loads(state["config_json"])
        new = self.config.to_dict()
        differ = [k for k in new if k not in RESUMABLE and old.get(k) != new.get(k)]
        if differ:
            changes = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in differ)
            raise ConfigError(f"checkpoint {path} was made with another recipe ({changes}); "
                              f"a resumed run may change only {', '.join(RESUMABLE[:4])} and "
                              f"where it writes")
        fp, now = json.loads(state.get("fingerprint_json", "null")), self.policy.fingerprint
        if fp is not None and now is not None:
            why = now.mismatch(Fingerprint(fp["shapes"], fp["sigma_sums"])) if \
                fp["shapes"] == now.shapes else "its adapted matrices differ in name or shape"
            if why:
                raise ConfigError(f"checkpoint {path} was trained on another base model: {why}")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best_score = float(state["best_score"])
        self.best_step = int(state["best_step"])
        self.best_state = state["best_state"]
        self.evals_since_best = int(state["evals_since_best"])
        self.evals = json.loads(state["evals_json"])

    # ---- loop ---------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run until ``config.steps`` (or early stopping). ``stop_after`` ends this call after
        that many steps (as an interruption would), checkpointing first, so a later run with
        ``resume=True`` continues where it stopped."""
        c = self.config
        stop_at = None if stop_after is None else self.step + int(stop_after)
        t_start = time.perf_counter()
        ckpt = c.checkpoint_path
        if c.resume and ckpt is not None and ckpt.exists():
            self.load_checkpoint()
            self.logger.drop_after(self.step)       # the steps the checkpoint does not hold
            self.logger.log({"event": "resume", "step": self.step})
        elif c.resume:
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt}")
        else:
            self.logger.log({"event": "config", "config": c.to_dict(),
                             "num_parameters": self.policy.num_parameters(),
                             "method": c.method})
            self._eval_and_keep_best()
            self.save_checkpoint()
        stopped_early = False
        bar = None
        if c.progress:
            from tqdm import tqdm
            bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.task}",
                       file=sys.stderr, mininterval=2, dynamic_ncols=True)
        interrupted = False
        try:
            with stop_requests() as stop:
                while self.step < c.steps:
                    if stop.requested or (stop_at is not None and self.step >= stop_at):
                        self.save_checkpoint()
                        interrupted = stop.requested
                        break
                    if c.patience is not None and self.evals_since_best >= c.patience:
                        stopped_early = True
                        break
                    self._step(bar)
        finally:
            if bar is not None:
                bar.close()
        if c.patience is not None and self.evals_since_best >= c.patience and \
                self.step < c.steps:
            stopped_early = True
        if self.best_state is not None:
            self.policy.load_state_dict(self.best_state)
        result = TrainResult(self.best_score, self.best_step, self.step, stopped_early,
                             c.out, self.policy.num_parameters(),
                             time.perf_counter() - t_start, list(self.evals), interrupted)
        self.logger.log({"event": "interrupted" if interrupted else "done",
                         "best": self.best_score, "best_step": self.best_step,
                         "steps_run": self.step, "stopped_early": stopped_early,
                         "wall_s": result.wall_s, **({"step": self.step} if interrupted else {})})
        self.logger.close()
        return result


    def _step(self, bar) -> None:
        """One optimisation step, logged; then the evaluation and checkpoint it is due."""
        c = self.config
        t0 = time.perf_counter()
        examples = self.batch_examples(self.step)
        stats = self.rl_step(examples) if c.objective == "rl" else self.sft_step(examples)
        self.step += 1
        stats.update(event="step", step=self.step, step_s=time.perf_counter() - t0)
        self.logger.log(stats)
        if bar is not None:
            bar.update(1)
            show = {k: f"{stats[k]:.3f}" for k in ("reward", "kl", "loss")
                    if stats.get(k) is not None}
            if self.evals:
                show["val"] = f"{self.evals[-1]['accuracy']:.3f}"
            bar.set_postfix(show, refresh=False)
        if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps:
            self._eval_and_keep_best()
            self.save_checkpoint()


def train(config: TrainConfig, model=None, tokenizer=None, init_z=None, task=None
          ) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it (``task``: a custom Task object
    instead of the registry's ``config.task``)."""
    return Trainer(config, model, tokenizer, init_z=init_z, task=task).train()
