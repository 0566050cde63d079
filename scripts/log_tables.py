#!/usr/bin/env python
"""Render the training-run tables of ``experts/README.md`` from the shipped JSONL logs.

Each row summarises one ``t2fast train`` log (``--log``): steps run, sampled accuracy of the
training rollouts (mean of the first vs the last 25 steps), greedy validation accuracy (step 0,
the base model → the best evaluation (its step) → the last one) and the KL term (mean of the
last 10 steps; "—" for a run without it). The tables sit in the README between
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; a test checks that they are what this
script renders.

    python scripts/log_tables.py            # print the tables
    python scripts/log_tables.py --write    # rewrite them in experts/README.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "experts" / "README.md"
E, B, S = "experts", "experts/baselines", "experts/sweep"

#: table name → rows (label, log file relative to the repository).
TABLES: dict[str, list[tuple[str, str]]] = {
    "runs": [
        *((f"SVF RL {f}", f"{E}/{f}.safetensors.log.jsonl")
          for f in ("arith", "strings", "choice", "classify")),
        *((f"SVF SFT {f}", f"{B}/svf_sft_{f}.safetensors.log.jsonl")
          for f in ("arith", "strings", "choice")),
        *((f"LoRA RL {f}", f"{B}/lora_rl_{f}.log.jsonl") for f in ("arith", "strings", "choice")),
        *((f"LoRA SFT {f}", f"{B}/lora_sft_{f}.log.jsonl") for f in ("arith", "strings", "choice")),
    ],
    "sweep": [
        ("`RL` (400 steps, lr 1e-2, λ 0.05, per-prompt baseline; the shipped expert)",
         f"{E}/arith.safetensors.log.jsonl"),
        ("200 steps, lr 1e-2", f"{S}/arith_200_lr1e-2.safetensors.log.jsonl"),
        ("200 steps, lr 2e-2", f"{S}/arith_200_lr2e-2.safetensors.log.jsonl"),
        ("200 steps, lr 3e-2", f"{S}/arith_200_lr3e-2.safetensors.log.jsonl"),
        ("plain REINFORCE (`--baseline none`)", f"{S}/arith_plain.safetensors.log.jsonl"),
        ("λ = 0 (no KL)", f"{S}/arith_nokl.safetensors.log.jsonl"),
        ("λ = 0.2", f"{S}/arith_kl0.2.safetensors.log.jsonl"),
        ("`strings`: 200 steps, lr 1e-2", f"{S}/strings_200_lr1e-2.safetensors.log.jsonl"),
    ],
    "stage4": [
        ("`RL` at 200 steps (lr 1e-2, λ 0.05, per-prompt baseline)",
         f"{S}/stage4/choice_lr1e-2.safetensors.log.jsonl"),
        ("lr 2e-3 (the paper's)", f"{S}/stage4/choice_lr2e-3.safetensors.log.jsonl"),
        ("lr 3e-2", f"{S}/stage4/choice_lr3e-2.safetensors.log.jsonl"),
        ("plain REINFORCE (`--baseline none`)", f"{S}/stage4/choice_plain.safetensors.log.jsonl"),
        ("λ = 0 (no KL)", f"{S}/stage4/choice_nokl.safetensors.log.jsonl"),
        ("λ = 0.2", f"{S}/stage4/choice_kl0.2.safetensors.log.jsonl"),
        ("`strings`: lr 3e-2", f"{S}/stage4/strings_lr3e-2.safetensors.log.jsonl"),
    ],
}
HEADERS = {name: ("run" if name == "runs" else "variant", "steps run", "sampled acc",
                  "validation (greedy)", "KL at the end") for name in TABLES}


def read_log(path: Path) -> dict[str, list[dict]]:
    """The records of a JSONL training log, by event (config, step, eval, done)."""
    events: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        events.setdefault(rec["event"], []).append(rec)
    return events


def summarise(path: Path) -> tuple[str, str, str, str]:
    """(steps run, sampled accuracy, validation, KL) of one log, as the tables print them."""
    ev = read_log(path)
    config, done, evals, steps = ev["config"][0]["config"], ev["done"][-1], ev["eval"], ev["step"]
    run = f"{done['steps_run']}" + (" (early stop)" if done["stopped_early"] else "")
    sampled = [s["accuracy"] for s in steps if "accuracy" in s]
    acc = (f"{sum(sampled[:25]) / len(sampled[:25]):.3f} → "
           f"{sum(sampled[-25:]) / len(sampled[-25:]):.3f}" if sampled else "")
    first, last = evals[0], evals[-1]
    best = max(evals, key=lambda e: (e["accuracy"], -e["step"]))
    val = (f"{first['accuracy']:.3f} (0) → {last['accuracy']:.3f}" if best["step"] == 0 else
           f"{first['accuracy']:.3f} → {best['accuracy']:.3f} ({best['step']}) → "
           f"{last['accuracy']:.3f}")
    if config["objective"] != "rl":
        kl = ""
    elif config["kl_coef"] == 0 and not config.get("log_kl"):
        kl = "—"
    else:
        tail = [s["kl"] for s in steps[-10:]]
        kl = f"{sum(tail) / len(tail):.3f}"
    return run, acc, val, kl


def render(name: str, root: Path = ROOT) -> str:
    """The markdown table ``name`` of :data:`TABLES`."""
    head = HEADERS[name]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join((label, *summarise(root / log))) + " |"
             for label, log in TABLES[name]]
    return "\n".join(rows)


def marked(name: str) -> re.Pattern:
    """The block of table ``name`` in the README: (opening line, table, closing line)."""
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)\n?(<!-- /table:{name} -->)", re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite the tables in {README}")
    args = ap.parse_args(argv)
    text = README.read_text()
    for name in TABLES:
        table = render(name)
        if not args.write:
            print(table, end="\n\n")
            continue
        if not marked(name).search(text):
            sys.exit(f"{README}: no <!-- table:{name} --> ... <!-- /table:{name} --> block")
        text = marked(name).sub(lambda m: m.group(1) + table + "\n" + m.group(3), text)
    if args.write:
        README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
