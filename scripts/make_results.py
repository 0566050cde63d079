#!/usr/bin/env python
"""Measure the tiny world's quality results and write ``results/README.md`` + ``results.json``.

Reads the shipped experts (``experts/*.safetensors``: one per training family plus the
classification expert) and the baselines (``experts/baselines/``: SVF trained with SFT, LoRA
trained with RL and with SFT) and measures, with greedy decoding on the test splits:

1. training families: base vs SVF (RL) vs SVF (SFT) vs LoRA (RL) vs LoRA (SFT);
2. held-out families: base vs prompt dispatch (A) vs classification expert (B) vs few-shot CEM (C,
   several seeds / few-shot sets) vs uniform α, with the parent family's expert as a reference;
3. classification confusion matrices (prompt-based vs classification expert) on the classify
   test split, and which expert each strategy picks on the held-out families;
4. the α found by CEM, and pass-1 / pass-2 times.

Every accuracy comes with its Wilson 95% interval; the only randomness is CEM's (seeded).

    python scripts/make_results.py                    # n=500 per test split, CEM seeds 0 1 2
    python scripts/make_results.py --n 100 --cem-seeds 0 --out /tmp/results   # quicker
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import t2fast  # noqa: E402
from t2fast.adapt import (CEMConfig, ClassifierDispatch, FixedMixture, PromptDispatch,  # noqa: E402
                          TwoPassEngine, fewshot_cem, uniform_alpha)
from t2fast.experts import load_expert  # noqa: E402
from t2fast.models import load_tiny  # noqa: E402
from t2fast.tasks import (CLASSIFY, HELDOUT_FAMILIES, OTHER, PARENT_FAMILY,  # noqa: E402
                          TRAIN_FAMILIES, get_task)
from t2fast.train import evaluate, max_new_tokens_for, wilson_interval  # noqa: E402
from t2fast.train.evaluate import score_generations  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=Path, default=ROOT / "experts")
    p.add_argument("--baselines", type=Path, default=ROOT / "experts" / "baselines")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: the bundled tiny model)")
    p.add_argument("--n", type=int, default=500, help="test examples per task")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples for CEM")
    p.add_argument("--cem-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cem-iterations", type=int, default=20)
    p.add_argument("--cem-population", type=int, default=16)
    p.add_argument("--per-layer", action="store_true", help="also run per-layer CEM")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render README.md from an earlier results.json (no measurement)")
    return p.parse_args(argv)


def acc_record(res) -> dict:
    lo, hi = res.ci95
    return {"n": res.n, "correct": res.correct, "accuracy": res.accuracy, "ci95": [lo, hi]}


def fmt(rec: dict | None) -> str:
    if rec is None:
        return "—"
    lo, hi = rec["ci95"]
    return f"{rec['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def cem_summary(runs: list[dict]) -> dict:
    """CEM over several seeds (each seed: its own few-shot set and search, evaluated on the same
    test examples): the mean accuracy and the per-seed range. Seeds are not pooled into one
    interval because they share the test questions."""
    accs = [r["accuracy"] for r in runs]
    return {"runs": runs, "accuracy": sum(accs) / len(accs), "min": min(accs),
            "max": max(accs), "n": runs[0]["n"], "seeds": len(runs)}


def fmt_any(rec: dict | None) -> str:
    """Wilson-interval format, or 'mean (per-seed accuracies)' for a CEM summary."""
    if rec is not None and "runs" in rec:
        per = ", ".join(f"{r['accuracy']:.3f}" for r in rec["runs"])
        return f"{rec['accuracy']:.3f} (seeds: {per})"
    return fmt(rec)


def seeds_vs(cem: dict, other: dict) -> dict:
    """How many CEM seeds are significantly higher / same / lower than ``other``."""
    c = Counter(significantly(r, other) for r in cem["runs"])
    return {k: c.get(k, 0) for k in ("higher", "same", "lower")}


def seeds_phrase(counts: dict) -> str:
    n = sum(counts.values())
    return (f"{counts['higher']}/{n} seeds significantly higher, {counts['same']}/{n} no "
            f"significant difference, {counts['lower']}/{n} significantly lower")


def significantly(a: dict, b: dict) -> str:
    """'higher' / 'lower' when the two-proportion z-test (two-sided, 5%) says so, else 'same'."""
    n1, n2 = a["n"], b["n"]
    p1, p2 = a["correct"] / n1, b["correct"] / n2
    p = (a["correct"] + b["correct"]) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p) * (1 / n1 + 1 / n2), 1e-12))
    z = (p1 - p2) / se
    return "higher" if z > 1.96 else "lower" if z < -1.96 else "same"


class World:
    def __init__(self, args):
        self.args = args
        self.expert_paths = {f: args.experts / f"{f}.safetensors" for f in TRAIN_FAMILIES}
        self.classifier_path = args.experts / f"{CLASSIFY}.safetensors"
        for p in [*self.expert_paths.values(), self.classifier_path]:
            if not p.exists():
                raise SystemExit(f"missing expert {p}; see experts/README.md for the commands")
        self.column_labels = {"base": "base"}

    def fresh(self):
        model, tok = load_tiny(path=self.args.model)
        return model, tok

    def examples(self, task, split="test"):
        return get_task(task).examples(split, self.args.n)

    def eval_model(self, model, tok, task_name, before_chunk=None):
        task = get_task(task_name)
        return evaluate(model, tok, task, self.examples(task_name),
                        max_new_tokens=max_new_tokens_for(task_name),
                        batch_size=self.args.batch_size, before_chunk=before_chunk)


def train_family_results(w: World) -> tuple[dict, dict]:
    rows, params = {}, {}
    model, tok = w.fresh()
    for f in TRAIN_FAMILIES:
        rows.setdefault(f, {})["base"] = acc_record(w.eval_model(model, tok, f))
    handle = t2fast.patch_model(model, experts=list(w.expert_paths.values()), backend="torch",
                                progress=False)
    for f in TRAIN_FAMILIES:
        handle.set_mixture(f)
        rows[f]["svf_rl"] = acc_record(w.eval_model(model, tok, f))
    params["svf"] = sum(int(l.rank) for l in handle.layers.values())
    lr = load_expert(w.expert_paths[TRAIN_FAMILIES[0]]).extra.get("config", {}).get("lr")
    w.column_labels["svf_rl"] = f"SVF (RL, lr {lr:g})" if lr else "SVF (RL)"
    handle.restore()
    if w.args.skip_baselines:
        return rows, params
    bdir = w.args.baselines
    for f in TRAIN_FAMILIES:
        p = bdir / f"svf_sft_{f}.safetensors"
        if p.exists():
            model, tok = w.fresh()
            h = t2fast.patch_model(model, experts=[p], backend="torch", progress=False)
            h.set_mixture(h.expert_names[0])
            rows[f]["svf_sft"] = acc_record(w.eval_model(model, tok, f))
            lr = load_expert(p).extra.get("config", {}).get("lr")
            w.column_labels["svf_sft"] = f"SVF (SFT, lr {lr:g})" if lr else "SVF (SFT)"
        for d in sorted(bdir.glob(f"lora_*_{f}")):
            if not (d / "adapter_config.json").exists():
                continue
            from t2fast.train.policy import LoRAPolicy
            variant = d.name[len("lora_"):-len(f) - 1]           # "rl", "sft", "rl_lr1e-3"
            model, tok = w.fresh()
            pol = LoRAPolicy.load(model, d)
            params.setdefault("lora", sum(v.numel() for n, v in pol.model.named_parameters()
                                          if "lora_" in n))
            meta = json.loads((d / "t2fast_meta.json").read_text()) if (
                d / "t2fast_meta.json").exists() else {}
            cfg = meta.get("extra", {}).get("config", {})
            labels = w.column_labels
            labels[f"lora_{variant}"] = (f"LoRA ({cfg.get('objective', variant).upper()}, "
                                         f"lr {cfg.get('lr', '?'):g})")
            rows[f][f"lora_{variant}"] = acc_record(w.eval_model(pol.model, tok, f))
    return rows, params


def confusion(true: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    idx = {l: i for i, l in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred):
        m[idx[t]][idx.get(p, idx[OTHER])] += 1
    return m


def classification_results(w: World) -> dict:
    model, tok = w.fresh()
    handle = t2fast.patch_model(model, experts=[*w.expert_paths.values(), w.classifier_path],
                                backend="torch", progress=False)
    families = list(TRAIN_FAMILIES)
    labels = families + [OTHER]
    cls_task = get_task(CLASSIFY)
    exs = cls_task.examples("test", w.args.n)
    # the inner questions, as pass 1 sees them (the dispatchers build the classify prompt)
    inner = [e.meta.get("source_family") for e in exs]
    prompts = [e.prompt.replace("Q: classify: ", "Q: ", 1) for e in exs]
    out = {}
    for name, strat in (("prompt", PromptDispatch(handle, tok, families)),
                        ("classifier", ClassifierDispatch(handle, tok, CLASSIFY, families))):
        t0 = time.perf_counter()
        pred = strat.classify(prompts)
        dt = time.perf_counter() - t0
        correct = sum(p == t for p, t in zip(pred, inner))
        lo, hi = wilson_interval(correct, len(exs))
        out[name] = {"n": len(exs), "correct": correct, "accuracy": correct / len(exs),
                     "ci95": [lo, hi], "labels": labels,
                     "confusion": confusion(inner, pred, labels), "seconds": dt}
    return out


def heldout_results(w: World) -> dict:
    a = w.args
    families = list(TRAIN_FAMILIES)
    out = {}
    model, tok = w.fresh()
    handle = t2fast.patch_model(model, experts=list(w.expert_paths.values()), backend="torch",
                                progress=False)
    model_c, tok_c = w.fresh()
    handle_c = t2fast.patch_model(model_c, experts=[*w.expert_paths.values(),
                                                    w.classifier_path],
                                  backend="torch", progress=False)
    for h in HELDOUT_FAMILIES:
        task = get_task(h)
        exs = w.examples(h)
        prompts = [e.prompt for e in exs]
        mnt = max_new_tokens_for(h)
        eng = TwoPassEngine(handle, tok, max_new_tokens=mnt, batch_size=a.batch_size)
        eng_c = TwoPassEngine(handle_c, tok_c, max_new_tokens=mnt, batch_size=a.batch_size)
        rec: dict = {"parent": PARENT_FAMILY[h]}

        def run(name, engine, strategy):
            r = engine.run(prompts, strategy)
            ev = score_generations(task, r.outputs, exs)
            entry = {**acc_record(ev), "pass1_s": r.pass1_s, "pass2_s": r.pass2_s}
            if r.labels is not None:
                entry["picked"] = dict(Counter(r.labels))
            rec[name] = entry

        run("base", eng, FixedMixture(None, "base"))
        run("parent_expert", eng, FixedMixture(PARENT_FAMILY[h], "parent"))
        run("uniform", eng, FixedMixture(uniform_alpha(len(families)), "uniform"))
        run("prompt", eng, PromptDispatch(handle, tok, families))
        run("classifier", eng_c, ClassifierDispatch(handle_c, tok_c, CLASSIFY, families))
        for per_layer in ([False, True] if a.per_layer else [False]):
            key = "cem_per_layer" if per_layer else "cem"
            runs = []
            for seed in a.cem_seeds:
                shots = task.examples("validation", a.shots * (seed + 1))[a.shots * seed:]
                cfg = CEMConfig(population=a.cem_population, iterations=a.cem_iterations,
                                seed=seed, per_layer=per_layer)
                res = fewshot_cem(handle, tok, task, shots, cfg)
                r = eng.run(prompts, FixedMixture(res.alpha, key))
                ev = score_generations(task, r.outputs, exs)
                runs.append({"seed": seed, **acc_record(ev), "alpha": res.alpha.tolist(),
                             "fewshot_accuracy": res.score, "fewshot_loglik": res.tiebreak,
                             "cem_s": res.wall_s, "evaluations": res.evaluations,
                             "pass2_s": r.pass2_s,
                             "best_by_iteration": [x["best_accuracy"] for x in res.history]})
            rec[key] = cem_summary(runs)
        out[h] = rec
    return out


def checkpoint_info(w: World) -> dict:
    """Best step of every shipped expert and baseline (from their metadata)."""
    out = {}
    files = [*w.expert_paths.values(), w.classifier_path]
    if not w.args.skip_baselines:
        files += sorted(w.args.baselines.glob("svf_sft_*.safetensors"))
    for p in files:
        out[str(p.relative_to(w.args.experts.parent)) if p.is_relative_to(w.args.experts.parent)
            else p.name] = {"best_step": load_expert(p).extra.get("best_step")}
    if not w.args.skip_baselines:
        for d in sorted(w.args.baselines.glob("lora_*")):
            m = d / "t2fast_meta.json"
            if m.exists():
                key = (str(d.relative_to(w.args.experts.parent))
                       if d.is_relative_to(w.args.experts.parent) else d.name)
                out[key] = {"best_step": json.loads(m.read_text())["extra"].get("best_step")}
    return out


def expert_info(w: World) -> dict:
    info = {}
    for f, p in [*w.expert_paths.items(), (CLASSIFY, w.classifier_path)]:
        e = load_expert(p)
        cfg = e.extra.get("config", {})
        info[f] = {"best_step": e.extra.get("best_step"),
                   "validation_accuracy": e.extra.get("validation_accuracy"),
                   "seed": cfg.get("seed"), "steps": cfg.get("steps"), "lr": cfg.get("lr"),
                   "kl_coef": cfg.get("kl_coef"), "batch_size": cfg.get("batch_size"),
                   "samples_per_prompt": cfg.get("samples_per_prompt"),
                   "parameterization": cfg.get("parameterization"),
                   "command": cfg.get("extra", {}).get("command")}
    return info


# ---- report -----------------------------------------------------------------------------
def render(results: dict) -> str:
    a = results["args"]
    L = ["# Measured results in the tiny world", "",
         "Generated by `python scripts/make_results.py` "
         f"(n = {a['n']} test examples per task, greedy decoding, CEM seeds {a['cem_seeds']}, "
         f"{a['shots']} shots, population {a['cem_population']}, {a['cem_iterations']} "
         "iterations). Brackets are Wilson 95% intervals. Do not edit by hand.", "",
         f"Machine: {results['machine']}; total {results['wall_s']:.0f} s.", ""]
    tr = results["train_families"]
    labels = results["column_labels"]
    order = ["base", "svf_rl", "svf_sft"] + sorted(k for k in labels if k.startswith("lora_"))
    cols = [(k, labels[k]) for k in order if k in labels]
    L += ["## 1. Training families (test split)", "",
          "| family | " + " | ".join(c[1] for c in cols) + " |",
          "|---|" + "---|" * len(cols)]
    for f, r in tr.items():
        L.append(f"| {f} | " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    p = results["parameters"]
    L += ["", f"Trainable parameters per expert: SVF {p.get('svf', '?'):,} (one z entry per "
          f"singular value of every adapted matrix)"
          + (f"; LoRA {p['lora']:,}" if "lora" in p else "") + ".", ""]
    ho = results["heldout"]
    L += ["## 2. Held-out families (test split)", "",
          "| family | base | prompt (A) | classifier (B) | few-shot CEM (C) | uniform α | "
          "parent expert (reference) |", "|---|---|---|---|---|---|---|"]
    for h, r in ho.items():
        L.append(f"| {h} | {fmt(r['base'])} | {fmt(r['prompt'])} | {fmt(r['classifier'])} | "
                 f"{fmt_any(r['cem'])} | {fmt(r['uniform'])} | {fmt(r['parent_expert'])} "
                 f"({r['parent']}) |")
    if any("cem_per_layer" in r for r in ho.values()):
        L += ["", "Per-layer CEM (α ∈ R^{layers × experts}): " + "; ".join(
            f"{h} {fmt_any(r.get('cem_per_layer'))}"
                                                for h, r in ho.items()) + "."]
    L += ["", "Few-shot CEM: mean test accuracy over the seeds (each seed draws its own "
          "few-shot examples from the validation split and runs its own search), then each seed's "
          "accuracy; Wilson intervals per seed below.", "",
          "### α found by few-shot CEM (bank order: " + ", ".join(results["bank"]) + ")", "",
          "| family | seed | α | few-shot acc | test acc | CEM time (s) |", "|---|---|---|---|---|---|"]
    for h, r in ho.items():
        for run in r["cem"]["runs"]:
            al = ", ".join(f"{v:+.2f}" for v in run["alpha"])
            L.append(f"| {h} | {run['seed']} | ({al}) | {run['fewshot_accuracy']:.2f} | "
                     f"{fmt(run)} | {run['cem_s']:.1f} |")
    L += ["", "### Experts picked on the held-out families (pass 1)", "",
          "| family | strategy | picked |", "|---|---|---|"]
    for h, r in ho.items():
        for s in ("prompt", "classifier"):
            picked = ", ".join(f"{k}: {v}" for k, v in sorted(r[s]["picked"].items()))
            L.append(f"| {h} | {s} | {picked} |")
    L += ["", "### Pass-1 / pass-2 time (s) for the held-out test sets", "",
          "| family | strategy | pass 1 | pass 2 |", "|---|---|---|---|"]
    for h, r in ho.items():
        for s in ("base", "uniform", "prompt", "classifier"):
            L.append(f"| {h} | {s} | {r[s]['pass1_s']:.2f} | {r[s]['pass2_s']:.2f} |")
    L += ["", "## 3. Classification (pass 1) on the classify test split", ""]
    for s, r in results["classification"].items():
        labels = r["labels"]
        L += [f"**{s}** — accuracy {fmt(r)}", "",
              "| true \\ predicted | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
        for lab, row in zip(labels, r["confusion"]):
            L.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
        L.append("")
    L += ["## 4. Reading the numbers", ""]
    L += [f"- {t}" for t in results.get("notes", [])]
    L += ["", "## 5. Paper trends: reproduced or not", "",
          "Two-sided two-proportion z-test at 5% on the test examples.", ""]
    L += [f"- {t}" for t in results["trends"]]
    L += ["", "## Experts", "", "| expert | seed | steps | best step | validation acc | lr | λ (KL) "
          "| batch × samples | z |", "|---|---|---|---|---|---|---|---|---|"]
    for f, e in results["experts"].items():
        va = e["validation_accuracy"]
        L.append(f"| {f} | {e['seed']} | {e['steps']} | {e['best_step']} | "
                 f"{va if va is None else round(va, 3)} | {e['lr']} | {e['kl_coef']} | "
                 f"{e['batch_size']} × {e['samples_per_prompt']} | {e['parameterization']} |")
    L += ["", "Commands: see `experts/README.md`.", ""]
    return "\n".join(L)


def notes(results: dict) -> list[str]:
    """Facts needed to read the tables, derived from the measurements and the files."""
    out = []
    for name, info in results.get("checkpoints", {}).items():
        if info.get("best_step") == 0:
            out.append(f"`{name}`: no evaluation during training beat step 0 on the validation "
                       f"split, so its best checkpoint is its initialisation — the base model "
                       f"(z = 1 for SVF, B = 0 for LoRA); its column equals the base model.")
    c = results["classification"]
    if min(c["prompt"]["accuracy"], c["classifier"]["accuracy"]) >= 0.99:
        out.append("The base model already classifies the classify test split (questions of the "
                   "training families and 'other') perfectly with the adaptation prompt, so a "
                   "classification expert cannot improve on prompt-based dispatch in "
                   "distribution; strategies A and B pick the same experts here.")
    for h, r in results["heldout"].items():
        picked = r["prompt"].get("picked", {})
        n = sum(picked.values()) or 1
        share = picked.get(r["parent"], 0) / n
        out.append(f"{h}: pass 1 (prompt) sends {share:.0%} of the prompts to the "
                   f"{r['parent']} expert and {picked.get(OTHER, 0) / n:.0%} to the base "
                   f"model ('other'); the {r['parent']} expert alone scores "
                   f"{fmt(r['parent_expert'])} against the base model's {fmt(r['base'])}.")
    return out


def trends(results: dict) -> list[str]:
    out = []
    tr = results["train_families"]
    for f, r in tr.items():
        s = significantly(r["svf_rl"], r["base"])
        verdict = {"higher": "reproduced", "same": "NOT reproduced (no significant change)",
                   "lower": "NOT reproduced (SVF is worse)"}[s]
        out.append(f"SVF (RL) improves on the base model on {f}: {verdict} "
                   f"({fmt(r['svf_rl'])} vs {fmt(r['base'])}).")
        for b in sorted(k for k in r if k.startswith("lora_")):
            if b in r:
                s = significantly(r["svf_rl"], r[b])
                word = {"higher": "SVF better", "same": "no significant difference",
                        "lower": "LoRA better"}[s]
                out.append(f"SVF (RL) vs {results['column_labels'].get(b, b)} "
                           f"on {f}: {word} ({fmt(r['svf_rl'])} vs {fmt(r[b])}).")
    ho = results["heldout"]
    for h, r in ho.items():
        for s in ("prompt", "classifier"):
            d = significantly(r[s], r["base"])
            out.append(f"Two-pass {s} beats the base model on {h}: "
                       + {"higher": "reproduced", "same": "NOT reproduced (no significant "
                          "difference)", "lower": "NOT reproduced (worse than base)"}[d]
                       + f" ({fmt(r[s])} vs {fmt(r['base'])}).")
        for other, what in (("base", "the base model"), ("uniform", "uniform α"),
                            ("prompt", "prompt dispatch (A)")):
            c = seeds_vs(r["cem"], r[other])
            verdict = ("reproduced" if c["higher"] == sum(c.values()) else
                       "NOT reproduced" if c["higher"] == 0 else "partly reproduced")
            out.append(f"Few-shot CEM (C) beats {what} on {h}: {verdict} ({seeds_phrase(c)}; "
                       f"CEM {fmt_any(r['cem'])} vs {fmt(r[other])}).")
    c = results["classification"]
    d = significantly(c["classifier"], c["prompt"])
    out.append("The classification expert classifies better than the prompt alone: "
               + {"higher": "reproduced", "same": "NOT reproduced (no significant difference)",
                  "lower": "NOT reproduced (prompt better)"}[d]
               + f" ({fmt(c['classifier'])} vs {fmt(c['prompt'])}).")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["checkpoints"] = checkpoint_info(World(args))
        for h in results["heldout"].values():
            for key in ("cem", "cem_per_layer"):
                if key in h:
                    h[key] = cem_summary(h[key]["runs"])
        results["notes"] = notes(results)
        results["trends"] = trends(results)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "README.md").write_text(render(results))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    w = World(args)
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), "
                          f"torch {torch.__version__}",
               "bank": list(TRAIN_FAMILIES)}
    print("training families ...", flush=True)
    results["train_families"], results["parameters"] = train_family_results(w)
    results["column_labels"] = w.column_labels
    print("classification ...", flush=True)
    results["classification"] = classification_results(w)
    print("held-out families ...", flush=True)
    results["heldout"] = heldout_results(w)
    results["experts"] = expert_info(w)
    results["checkpoints"] = checkpoint_info(w)
    results["notes"] = notes(results)
    results["trends"] = trends(results)
    results["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "README.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
