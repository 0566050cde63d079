#!/usr/bin/env python
"""Pre-train the bundled tiny Llama model on a mixture of the tiny world's task families.

Trains from scratch on the training split of the training families, the classification task and
(at a low rate) the held-out families, with next-token loss on the answer characters and the
end-of-sequence token. Training deliberately stops early, so that greedy accuracy on each
training family is well above zero and well below perfect: RL then has signal and room.

Reproduce the bundled weights (1500 steps, about 30 minutes on one busy CPU core; see
t2fast/assets/tiny_llama/README.md for the measured time and accuracies):

    python scripts/train_tiny_model.py --seed 0

The model, tokenizer and a ``training_report.json`` (per-family greedy accuracy on the test
split) are written to ``t2fast/assets/tiny_llama/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
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
from t2fast.tasks import CLASSIFY, HELDOUT_FAMILIES, TRAIN_FAMILIES, get_task  # noqa: E402

#: Share of each task in the pre-training mixture.
DEFAULT_MIX = {
    "arith": 0.42, "strings": 0.12, "choice": 0.30, CLASSIFY: 0.10,
    "arith_chain": 0.02, "strings_compose": 0.02, "choice_order": 0.02,
}
#: New tokens to generate when evaluating each task (answers are short).
MAX_NEW_TOKENS = {"arith": 8, "arith_chain": 8, "strings": 10, "strings_compose": 10,
                  "choice": 4, "choice_order": 4, CLASSIFY: 10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="torch / data-order seed")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (at most)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=2,
                   help="forward/backward passes per step (examples grouped by length)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--eval-every", type=int, default=300, help="validation every N steps (0: never)")
    p.add_argument("--stop-at", type=float, default=0.3,
                   help="stop early once every training family's validation accuracy reaches this")
    p.add_argument("--eval-n", type=int, default=128, help="validation examples per task")
    p.add_argument("--test-n", type=int, default=500, help="test examples per task for the final report")
    p.add_argument("--mix", type=str, default=None,
                   help="mixture as JSON, e.g. '{\"arith\": 0.5, \"strings\": 0.5}'")
    p.add_argument("--out", type=pathlib.Path, default=tiny_model_path())
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class Mixture:
    """Deterministic stream of training examples drawn from several tasks by weight."""

    def __init__(self, mix: dict[str, float], seed: int):
        self.names = sorted(mix)
        self.weights = [mix[n] for n in self.names]
        self.rng = random.Random(f"mixture:{seed}")
        # Sampled with replacement from the training split (small question spaces repeat).
        self.streams = {n: get_task(n).iter_examples("train", distinct=False) for n in self.names}


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
                               max_new_tokens=MAX_NEW_TOKENS.get(name, 12), batch_size=128)
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
    all_names = list(TRAIN_FAMILIES) + list(HELDOUT_FAMILIES) + [CLASSIFY]

    from transformers import LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_config()).to(torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {n_params / 1e6:.2f}M parameters; mixture {mix}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    data = Mixture(mix, args.seed)

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
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val = evaluate(model, tokenizer, TRAIN_FAMILIES, "validation", args.eval_n)
            history.append({"step": step + 1, "loss": round(ema, 4), "elapsed_s": round(time.time() - start, 1),
                            "validation": {k: v["accuracy"] for k, v in val.items()}})
            print(f"\nstep {step + 1} loss {ema:.3f} validation accuracy " +
                  " ".join(f"{k}={v['accuracy']:.2f}" for k, v in val.items()), flush=True)
            if args.stop_at and min(v["accuracy"] for v in val.values()) >= args.stop_at:
                print(f"every training family reached {args.stop_at:.2f}: stopping at step {step + 1}", flush=True)
                stopped_at = step + 1
                break
    train_s = time.time() - start

    test = evaluate(model, tokenizer, all_names, "test", args.test_n)
    wall_s = time.time() - start
    print("\ntest accuracy (greedy):", flush=True)
    for name, r in test.items():
        kind = "train" if name in TRAIN_FAMILIES else ("held-out" if name in HELDOUT_FAMILIES else "classify")
        print(f"  {name:16s} {kind:9s} acc {r['accuracy']:.3f}  95% CI {r['ci95']}  "
              f"parsable {r['parsable']:.3f}  n={r['n']}", flush=True)

    model.eval()
    save_tiny(model, tokenizer, args.out)
    report = {
        "command": "python scripts/train_tiny_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items() if k != "out"},
        "mixture": mix, "parameters": n_params, "train_seconds": round(train_s, 1),
        "wall_seconds": round(wall_s, 1), "torch": torch.__version__, "machine": platform.machine(),
        "steps_run": stopped_at, "final_loss": round(ema, 4), "validation_history": history, "test": test,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {args.out} (train {train_s:.0f}s, total {wall_s:.0f}s)", flush=True)
    return report


if __name__ == "__main__":
    main()
