#!/usr/bin/env python
"""Pre-train the bundled tiny Llama model on a mixture of the tiny world's task families.

Trains from scratch on the training split of the training families, the classification task and
(at a low rate) the held-out families, with next-token loss on the answer characters and the
end-of-sequence token.

The base model must leave room to learn: SVF experts are trained with RL on the training
families, which needs a base greedy accuracy well above zero (reward signal) and well below one
(room). So the run aims every *controlled* task (the training families) at a band of validation
accuracy (``--band``, default 0.30-0.60):

* every ``--eval-every`` steps it measures greedy validation accuracy on every task;
* a controlled task whose accuracy reached the band's centre is *held*: its share of the
  mixture drops to ``--hold-factor`` times its nominal share (default 1: no holding; stage 2
  below used 0.1); it gets its full share back if it falls below the centre;
* an evaluation at which every controlled task lies inside the band is a candidate checkpoint;
  the candidate whose accuracies sit farthest inside the band is kept (held-out families at
  or above ``--heldout-min`` first), or the last step's weights with ``--keep last``;
* the run stops at the first candidate that is ``--margin`` inside the band on every controlled
  task with every held-out family at or above ``--heldout-min`` (or after ``--steps``).

A share of each task's pre-training answers follows a *competing habit* (``--habit``; the
habits are listed in ``tiny_habits.py``): the model learns both rules, so that greedy decoding
picks the task's rule only part of the time and SVF experts have a preference to shift. After
each evaluation a task's habit share rises by ``--habit-step`` when its validation accuracy is
above the band (less ``--margin``) and falls when below. Validation and test answers always
follow the task's rule.

The bundled weights come from six runs (see t2fast/assets/tiny_llama/README.md for every
command, the measured times and accuracies): stage 1 is the first bundled model (1500 steps from
scratch on the tasks of that time, commit 04351ad); stages 2-4 continued it on the tasks of
their time, adding the habits; stage 5 (commit b6561e4) moved to today's tasks with steered
shares; stage 6 continues stage 5 with the habit shares fixed at one half on arith and strings:

    git show b6561e4:t2fast/assets/tiny_llama/model.safetensors > stage5.safetensors
    python scripts/train_tiny_model.py --seed 0 --init-from stage5.safetensors --steps 800 \
        --lr 7e-4 --warmup 20 --habit-step 0 --margin 0.15 --mix '{"arith": 0.36,
        "strings": 0.32, "choice": 0.10, "classify": 0.10, "arith_chain": 0.05,
        "strings_compose": 0.05, "choice_order": 0.02}' --habit '{"arith": 0.5,
        "arith_chain": 0.3, "strings": 0.5, "strings_compose": 0.4, "choice": 0.5,
        "choice_order": 0.2, "classify": 0.45}'

Without ``--init-from`` the run starts from a random initialisation (slower to reach the band:
see the README).

The model, tokenizer and a ``training_report.json`` (validation history, mixture changes and
per-family greedy accuracy on the test split) are written to ``t2fast/assets/tiny_llama/``
unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import platform
import random
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t2fast.models.tiny import (EOS_ID, PAD_ID, build_char_tokenizer, generate_greedy,  # noqa: E402
                                save_tiny, tiny_config, tiny_model_path)
from t2fast.tasks import (CLASSIFY, CLASSIFY_TRANSFER, FAMILY_KINDS,  # noqa: E402
                          HELDOUT_FAMILIES, STEP_FAMILIES, TRAIN_FAMILIES, TRANSFER_FAMILIES,
                          get_task)
from t2fast.train.rollout import max_new_tokens_for  # noqa: E402
from tiny_habits import HABITS, HabitStream  # noqa: E402

#: Share of each task in the pre-training mixture.
DEFAULT_MIX = {
    "arith": 0.44, "strings": 0.24, "choice": 0.10, CLASSIFY: 0.10,
    "arith_chain": 0.05, "strings_compose": 0.05, "choice_order": 0.02,
}
#: Share of each task's pre-training answers that follow its competing habit (tiny_habits.py).
DEFAULT_HABIT = {name: 0.5 for name in HABITS}
#: Tasks aimed at the accuracy band (the families SVF experts are trained on). ``classify`` is
#: not among them: its surface cues (digits, quotes, options) make it near-perfect within a few
#: dozen steps whatever its share.
CONTROLLED = tuple(TRAIN_FAMILIES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="torch / data-order seed")
    p.add_argument("--steps", type=int, default=1500,
                   help="optimizer steps at most (the cosine schedule spans them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=2,
                   help="forward/backward passes per step (examples grouped by length)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps")
    p.add_argument("--eval-n", type=int, default=200, help="validation examples per task")
    p.add_argument("--band", type=float, nargs=2, default=(0.30, 0.60), metavar=("LO", "HI"),
                   help="validation accuracy band aimed at for the controlled tasks")
    p.add_argument("--margin", type=float, default=0.05,
                   help="stop once every controlled task is this far inside the band")
    p.add_argument("--heldout-min", type=float, default=0.12,
                   help="held-out families' validation accuracy wanted before stopping")
    p.add_argument("--hold-factor", type=float, default=1.0,
                   help="share multiplier of a controlled task at or above the band's centre "
                        "(1: no holding)")
    p.add_argument("--habit", type=str, default=None,
                   help="initial habit share per task as JSON (default 0.5 for every task): "
                        "the share of its pre-training answers that follow the competing habit")
    p.add_argument("--habit-step", type=float, default=0.05,
                   help="after each evaluation, a task's habit share rises by this much when its "
                        "validation accuracy is above the band (less --margin) and falls when "
                        "below (0: fixed shares)")
    p.add_argument("--keep", choices=("band", "last"), default="band",
                   help="weights saved: the evaluation farthest inside the band (band), or the "
                        "last step's, whatever the band says (last: for continued pre-training "
                        "aimed at tasks outside the band, such as the transfer families)")
    p.add_argument("--test-n", type=int, default=500, help="test examples per task for the final report")
    p.add_argument("--mix", type=str, default=None,
                   help="mixture as JSON, e.g. '{\"arith\": 0.5, \"strings\": 0.5}'")
    p.add_argument("--init-from", type=pathlib.Path, default=None,
                   help="continue from these weights (a model.safetensors file of the same "
                        "shape) instead of a random initialisation")
    p.add_argument("--out", type=pathlib.Path, default=tiny_model_path())
    p.add_argument("--greedy-fixture", type=pathlib.Path, default=None,
                   help="also write the model's greedy outputs on 2 test prompts per task here "
                        "(tests/fixtures/tiny_greedy.json for the bundled model)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class Mixture:
    """Deterministic stream of training examples drawn from several tasks by weight."""

    def __init__(self, mix: dict[str, float], seed: int, habit: dict[str, float] | None = None):
        self.names = sorted(mix)
        self.nominal = dict(mix)
        self.weights = [mix[n] for n in self.names]
        self.rng = random.Random(f"mixture:{seed}")
        # Sampled with replacement from the training split (small question spaces repeat); a
        # share of each task's answers follows its habit.
        habit = habit or {}
        self.streams = {n: HabitStream(n, get_task(n).iter_examples("train", distinct=False),
                                       habit.get(n, 0.0), seed) for n in self.names}

    def habit_shares(self) -> dict[str, float]:
        return {n: round(s.share, 4) for n, s in self.streams.items() if s.share > 0}

    def steer_habits(self, acc: dict[str, float], lo: float, hi: float, step: float) -> None:
        """Raise the habit share of a task above the band ``[lo, hi]``, lower it below."""
        for n, s in self.streams.items():
            if n in acc and n in HABITS and step > 0:
                if acc[n] > hi:
                    s.share = min(0.9, s.share + step)
                elif acc[n] < lo:
                    s.share = max(0.0, s.share - step)

    def hold(self, held: set[str], factor: float) -> dict[str, float]:
        """Scale the nominal share of the tasks in ``held`` by ``factor`` (the others get their
        nominal share); returns the normalised mixture now in use."""
        self.weights = [self.nominal[n] * (factor if n in held else 1.0) for n in self.names]
        total = sum(self.weights)
        return {n: round(w / total, 4) for n, w in zip(self.names, self.weights)}

    def next_batch(self, size: int, micro_batches: int = 2) -> list[list]:
        """The next batch (drawn from the whole mixture), cut into ``micro_batches`` groups of
        similar length so that little compute goes to padding."""
        names = self.rng.choices(self.names, weights=self.weights, k=size)
        batch = [next(self.streams[n]) for n in names]
        batch.sort(key=lambda e: len(e.prompt) + len(e.answer))
        step = -(-size // micro_batches)
        return [batch[i:i + step] for i in range(0, size, step)]


def encode_batch(tokenizer, examples):
    """Right-padded input ids, attention mask and labels (loss on answer + eos only)."""
    rows, labels = [], []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt)["input_ids"]            # <s> + prompt
        answer_ids = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = -(-max(len(r) for r in rows) // 8) * 8  # few distinct shapes: faster CPU kernels
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(r)] = 1
    return ids, mask, lab


def evaluate(model, tokenizer, names, split: str, n: int) -> dict[str, dict]:
    """Greedy accuracy (and parsable rate) of ``model`` on ``n`` examples of each task."""
    model.eval()
    report = {}
    for name in names:
        task = get_task(name)
        exs = task.examples(split, n)
        gens = generate_greedy(model, tokenizer, [e.prompt for e in exs],
                               max_new_tokens=max_new_tokens_for(name), batch_size=128)
        scores = [task.score(g, e) for g, e in zip(gens, exs)]
        acc = sum(s.correct for s in scores) / len(scores)
        parsable = sum(s.parsable for s in scores) / len(scores)
        # 95% Wilson interval for the accuracy.
        z = 1.96
        centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        report[name] = {"accuracy": round(acc, 4), "parsable": round(parsable, 4), "n": len(scores),
                        "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]}
    model.train()
    return report


class Band:
    """Judges a validation result against the accuracy band (see the module docstring)."""

    def __init__(self, lo: float, hi: float, margin: float, heldout_min: float,
                 controlled: list[str], heldout: list[str]):
        if not 0.0 <= lo < hi <= 1.0:
            raise SystemExit(f"--band {lo} {hi}: expected 0 <= LO < HI <= 1")
        self.lo, self.hi, self.margin, self.heldout_min = lo, hi, margin, heldout_min
        self.centre = (lo + hi) / 2
        self.controlled, self.heldout = controlled, heldout

    def judge(self, acc: dict[str, float]) -> dict:
        """``margin``: how far the controlled task nearest an edge is inside the band (negative
        when outside); ``heldout_ok``: every held-out family at least ``heldout_min``."""
        margin = min(min(acc[n] - self.lo, self.hi - acc[n]) for n in self.controlled)
        heldout_ok = all(acc[n] >= self.heldout_min for n in self.heldout)
        return {"margin": round(margin, 4), "in_band": margin >= 0, "heldout_ok": heldout_ok,
                "done": margin >= self.margin and heldout_ok}

    @staticmethod
    def better(a: dict, b: dict) -> bool:
        return (a["heldout_ok"], a["margin"]) > (b["heldout_ok"], b["margin"])


def run_record(args, argv: list[str]) -> dict:
    """The command and arguments of a run as the report stores them: file paths shortened to
    their names (they are local to the machine), the initial weights identified by sha256."""
    paths = {k for k, v in vars(args).items() if isinstance(v, pathlib.Path)}
    flags = {"--" + k.replace("_", "-") for k in paths}
    words, prev = [], None
    for w in argv:
        words.append(pathlib.Path(w).name if prev in flags else w)
        prev = w
    rec = {"command": " ".join(["python scripts/train_tiny_model.py", *words]),
           "args": {k: (v.name if k in paths and v is not None else v)
                    for k, v in vars(args).items() if k not in ("out", "greedy_fixture")}}
    if args.init_from is not None:
        rec["init_from_sha256"] = hashlib.sha256(args.init_from.read_bytes()).hexdigest()
    return rec


def write_greedy_fixture(model, tokenizer, names, path: pathlib.Path, per_task: int = 2,
                         max_new_tokens: int = 10) -> None:
    """Greedy outputs (right or wrong) of ``model`` on the first test prompts of each task: the
    known outputs that tests compare the shipped model against."""
    cases = []
    for name in names:
        for ex in get_task(name).examples("test", per_task):
            cases.append({"task": name, "prompt": ex.prompt, "answer": ex.answer})
    outs = generate_greedy(model, tokenizer, [c["prompt"] for c in cases],
                           max_new_tokens=max_new_tokens)
    for c, o in zip(cases, outs):
        c["output"] = o
    path.write_text(json.dumps({"max_new_tokens": max_new_tokens, "cases": cases}, indent=1)
                    + "\n")


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    mix = json.loads(args.mix) if args.mix else DEFAULT_MIX
    habit = json.loads(args.habit) if args.habit else DEFAULT_HABIT
    # The transfer and two-step families (and their classification) are measured when they
    # are trained on.
    all_names = [*TRAIN_FAMILIES, *HELDOUT_FAMILIES, CLASSIFY,
                 *(n for n in (*TRANSFER_FAMILIES, *STEP_FAMILIES, CLASSIFY_TRANSFER) if n in mix)]

    from transformers import LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_config()).to(torch.float32)
    if args.init_from is not None:
        from safetensors.torch import load_file
        try:
            model.load_state_dict(load_file(str(args.init_from)))
        except RuntimeError as e:
            raise SystemExit(f"--init-from {args.init_from}: not weights of this model: {e}")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {n_params / 1e6:.2f}M parameters; mixture {mix}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    data = Mixture(mix, args.seed, habit)
    band = Band(args.band[0], args.band[1], args.margin, args.heldout_min,
                [n for n in CONTROLLED if n in mix], [n for n in HELDOUT_FAMILIES if n in mix])
    best = None

    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), disable=args.no_progress, mininterval=5, file=sys.stdout)
    except ImportError:  # pragma: no cover
        bar = range(args.steps)
    start = time.time()
    history = []
    ema = None
    stopped_at = args.steps
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        micro = data.next_batch(args.batch_size, args.micro_batches)
        encoded = [encode_batch(tokenizer, m) for m in micro]
        n_targets = sum(int((lab != -100).sum()) for _, _, lab in encoded)
        total = 0.0
        for ids, mask, labels in encoded:
            # mean over all answer tokens of the batch, whatever the micro-batch split
            k = int((labels != -100).sum())
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss * (k / n_targets)
            loss.backward()
            total += loss.item()
        loss = torch.tensor(total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, tokenizer, all_names, "validation", args.eval_n)
            acc = {k: v["accuracy"] for k, v in val.items()}
            verdict = band.judge(acc)
            held = {n for n in band.controlled if n in mix and acc[n] >= band.centre}
            in_use = data.hold(held, args.hold_factor)
            data.steer_habits(acc, args.band[0] + args.margin, args.band[1] - args.margin,
                              args.habit_step)
            history.append({"step": step + 1, "loss": round(ema, 4),
                            "elapsed_s": round(time.time() - start, 1), "validation": acc,
                            "held": sorted(held), "mixture": in_use,
                            "habit": data.habit_shares(), **verdict})
            print(f"\nstep {step + 1} loss {ema:.3f} validation " +
                  " ".join(f"{k}={v:.2f}" for k, v in acc.items()) +
                  (f"  held: {','.join(sorted(held))}" if held else "") +
                  (f"  in band (margin {verdict['margin']:.3f})" if verdict["in_band"] else ""),
                  flush=True)
            if verdict["in_band"] and (best is None or band.better(verdict, best["verdict"])):
                best = {"step": step + 1, "verdict": verdict,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            if verdict["done"]:
                print(f"every controlled task is {args.margin:.2f} inside the band and every "
                      f"held-out family at least {args.heldout_min:.2f}: stopping at step "
                      f"{step + 1}", flush=True)
                stopped_at = step + 1
                break
    train_s = time.time() - start
    kept_step = stopped_at
    if args.keep == "last":
        print(f"--keep last: keeping the weights of step {stopped_at}", flush=True)
    elif best is not None:
        model.load_state_dict(best["state"])
        kept_step = best["step"]
        print(f"kept the checkpoint of step {best['step']} (margin "
              f"{best['verdict']['margin']:.3f} inside the band)", flush=True)
    else:
        print(f"WARNING: no evaluation had every controlled task inside the band "
              f"{args.band}; keeping the last step's weights", flush=True)

    test = evaluate(model, tokenizer, all_names, "test", args.test_n)
    wall_s = time.time() - start
    print("\ntest accuracy (greedy):", flush=True)
    for name, r in test.items():
        kind = FAMILY_KINDS.get(name, "classify")
        print(f"  {name:16s} {kind:9s} acc {r['accuracy']:.3f}  95% CI {r['ci95']}  "
              f"parsable {r['parsable']:.3f}  n={r['n']}", flush=True)

    model.eval()
    save_tiny(model, tokenizer, args.out)
    report = {
        **run_record(args, argv if argv is not None else sys.argv[1:]),
        "mixture": mix, "habit": habit, "parameters": n_params, "train_seconds": round(train_s, 1),
        "wall_seconds": round(wall_s, 1), "torch": torch.__version__, "machine": platform.machine(),
        "steps_run": stopped_at, "kept_step": kept_step,
        "band_reached": best is not None, "final_loss": round(ema, 4),
        "validation_history": history, "test": test,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.greedy_fixture:
        write_greedy_fixture(model, tokenizer, all_names, args.greedy_fixture)
    print(f"saved to {args.out} (train {train_s:.0f}s, total {wall_s:.0f}s)", flush=True)
    return report


if __name__ == "__main__":
    main()
