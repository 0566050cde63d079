#!/usr/bin/env python
"""Measure the tiny world's quality results and write ``results/README.md`` + ``results.json``.

By default nothing is trained: the shipped experts (``experts/*.safetensors``: one SVF expert per
training family and the classification expert) and baselines (``experts/baselines/``) are
evaluated with greedy decoding on the test splits:

1. training families: base vs SVF (RL) vs the baselines (SVF trained with SFT, LoRA trained with
   RL and with SFT);
2. unseen families (held out, and the transfer families when the base model was pre-trained on
   them): base, the parent family's expert, uniform α, prompt dispatch (A), the classification
   expert (B), few-shot CEM (C) and its ablations (:data:`CEM_VARIANTS`), one row per seed (seed
   s searches with its own seed on few-shot set s, as ``t2fast adapt --strategy cem --seed s``
   does);
3. classification (pass 1) on the classify test split;
4. truncated experts: each training family's expert with only the top-k directions of
   σ ⊙ (z − 1) per matrix kept (``scripts/expert_truncation.py``), k = r/2 ... r/16;
5. surface variants (near transfer): every variant of ``scripts/surface_variants.py`` (the
   training families' test questions with spacing, quotes, case or punctuation changed): base,
   the family's expert and both dispatchers;
6. cross-model transfer: the experts on a second base model of the same shapes
   (``results/second_base/``), in σ order, in reversed order and shuffled, and few-shot CEM
   over them (``scripts/cross_model.py``);
7. transfer families on a base pre-trained on them (``results/transfer_base/``, with its own
   experts): base and expert on the training families, then every strategy of 2 on the
   transfer families (a new surface of a training family) and the two-step families (the
   transfer questions answered by first restating them as the parent family's question);
8. on the same base, the transfer and two-step families answered after the base model restates
   each question as its parent family's question (:class:`t2fast.adapt.Restated`): the base
   model, the parent's expert and both dispatchers on the restated questions.

``results.json`` keeps every measurement, including which test questions each system answered
correctly, so that every comparison is paired and tested with the exact McNemar test;
``README.md`` is rendered from the JSON alone by ``scripts/results_render.py``.

``--train`` first rebuilds every expert and baseline with the recipes in :data:`RECIPES` (the
commands listed in ``experts/README.md``), each writing its JSONL training log next to it.

    python scripts/make_results.py                     # evaluate the shipped experts (n = 500)
    python scripts/make_results.py --render-only       # README.md from results.json
    python scripts/make_results.py --train             # retrain everything, then evaluate
    python scripts/make_results.py --n 100 --cem-seeds 0 --out quick_results   # quicker
    python scripts/make_results.py --only cross_model  # re-measure one section, keep the rest
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import t2fast  # noqa: E402
from cross_model import ARMS, SECOND_BASE, SHUFFLE_SEEDS, reorder, weights_sha256  # noqa: E402
from expert_truncation import DIVISORS, correction_bytes_ratio, truncate  # noqa: E402
from surface_variants import VARIANTS, variant_examples  # noqa: E402
from tiny_habits import answers_with_habit  # noqa: E402
from log_tables import read_log  # noqa: E402
from results_render import render  # noqa: E402
from t2fast.adapt import (CEMConfig, ClassifierDispatch, FixedMixture, PromptDispatch,  # noqa: E402
                          TwoPassEngine, fewshot_cem, fewshot_examples, restated_examples,
                          restated_task, uniform_alpha)
from t2fast.config import SVFConfig  # noqa: E402
from t2fast.experts import load_expert  # noqa: E402
from t2fast.models import load_tiny  # noqa: E402
from t2fast.models import tiny_model_path  # noqa: E402
from t2fast.tasks import (CLASSIFY, FAMILY_KINDS, HELDOUT_FAMILIES, OTHER,  # noqa: E402
                          PARENT_FAMILY, STEP_FAMILIES, TRAIN_FAMILIES, TRANSFER_FAMILIES,
                          get_task)
from t2fast.tasks.steps import restated_right  # noqa: E402
from t2fast.train import evaluate, max_new_tokens_for  # noqa: E402
from t2fast.train.evaluate import EvalResult, score_generations  # noqa: E402

#: The shared recipes (``t2fast train`` options); experts/README.md explains each choice.
RL = ["--steps", "400", "--batch-size", "16", "--samples-per-prompt", "8", "--temperature",
      "1.0", "--lr", "1e-2", "--kl-coef", "0.05", "--baseline", "mean", "--eval-every", "25",
      "--eval-n", "256", "--patience", "4", "--seed", "0", "--threads", "1"]
SFT = ["--objective", "sft", "--steps", "200", "--batch-size", "32", "--lr", "5e-3",
       "--eval-every", "25", "--eval-n", "256", "--patience", "4", "--seed", "0",
       "--threads", "1"]
#: LoRA of rank 1 on the same matrices: the smallest LoRA there is (3.2x SVF's parameters).
#: Its RL runs use lr 1e-3: at SVF's 1e-2 LoRA-RL collapsed within 25 steps in earlier runs.
#: SVF's RL runs use lr 1e-2 (5x the paper's 2e-3, which moved too little in 100-200 steps of
#: 16 x 8 rollouts; experts/README.md has the runs), for 400 steps: at 200 the arith expert was
#: still improving (experts/README.md).
LORA = ["--method", "lora", "--lora-rank", "1", "--lora-alpha", "2"]
LORA_RL = [*(("1e-3" if prev == "--lr" else a) for prev, a in zip([""] + RL, RL)), *LORA]
#: Few-shot CEM settings measured on every unseen family besides the default ``cem`` (CEMConfig's
#: defaults with ``--shots`` shots): the search as it was (greedy accuracy on 5 shots, absolute
#: α from uniform 1/K, best member always kept), then one change at a time towards the default
#: (likelihood objective, 20 shots, residual α, keeping the base model unless the searched shots
#: show a gain; the default holds the last half of its shots out of the search to decide that).
CEM_VARIANTS: dict[str, dict] = {
    "cem_acc5": {"shots": 5, "objective": "accuracy", "space": "absolute", "keep_base": False},
    "cem_ll5": {"shots": 5, "objective": "likelihood", "space": "absolute", "keep_base": False},
    "cem_ll20": {"shots": 20, "objective": "likelihood", "space": "absolute",
                 "keep_base": False},
    "cem_res20": {"shots": 20, "objective": "likelihood", "space": "residual",
                  "keep_base": False},
    # the default with the searched shots deciding (the default until the transfer base)
    "cem_nocheck": {"shots": 20, "objective": "likelihood", "space": "residual",
                    "keep_base": True, "check_shots": 0},
}
#: Output (relative to the repository) → ``t2fast train`` arguments, in training order.
RECIPES: dict[str, list[str]] = {}
for _f in TRAIN_FAMILIES:
    RECIPES[f"experts/{_f}.safetensors"] = ["--task", _f, *RL]
RECIPES[f"experts/{CLASSIFY}.safetensors"] = ["--task", CLASSIFY, *RL]
for _f in TRAIN_FAMILIES:
    RECIPES[f"experts/baselines/svf_sft_{_f}.safetensors"] = ["--task", _f, *SFT]
    RECIPES[f"experts/baselines/lora_rl_{_f}"] = ["--task", _f, *LORA_RL]
    RECIPES[f"experts/baselines/lora_sft_{_f}"] = ["--task", _f, *SFT, *LORA]
#: The second base model's own experts (the cross-model section's reference), same RL recipe.
for _f in TRAIN_FAMILIES:
    RECIPES[f"{SECOND_BASE}/experts/{_f}.safetensors"] = ["--model", str(SECOND_BASE),
                                                         "--task", _f, *RL]
#: The transfer base model (pre-trained on the transfer and two-step families; its README has
#: the runs), relative to the repository root.
TRANSFER_BASE = Path("results") / "transfer_base"
#: Its own experts and classification expert, same RL recipe.
for _f in (*TRAIN_FAMILIES, CLASSIFY):
    RECIPES[f"{TRANSFER_BASE}/experts/{_f}.safetensors"] = ["--model", str(TRANSFER_BASE),
                                                           "--task", _f, *RL]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=Path, default=ROOT / "experts")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--n", type=int, default=500, help="test examples per task")
    p.add_argument("--shots", type=int, default=20, help="few-shot examples for CEM")
    p.add_argument("--no-cem-variants", action="store_true",
                   help="measure only the default CEM, not CEM_VARIANTS")
    p.add_argument("--cem-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cem-iterations", type=int, default=20)
    p.add_argument("--cem-population", type=int, default=16)
    p.add_argument("--per-layer", action="store_true", help="also run per-layer CEM")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", action="store_true",
                   help="first retrain every expert and baseline with RECIPES")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once with --train (each with its own process and "
                        "--threads 1)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite README.md from the results.json in --out (no measurement)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help="measure only these sections (" + ", ".join(SECTIONS) + ") and keep "
                        "the others from the results.json in --out")
    args = p.parse_args(argv)
    if args.n < 1 or args.shots < 1 or min(args.cem_seeds) < 0 or args.jobs < 1:
        p.error("--n, --shots and --jobs must be >= 1 and --cem-seeds >= 0")
    return args


def record(ev) -> dict:
    """Accuracy, Wilson interval and per-question correctness ('0'/'1' per test question)."""
    lo, hi = ev.ci95
    return {"n": ev.n, "correct": ev.correct, "accuracy": ev.accuracy, "ci95": [lo, hi],
            "correct_mask": "".join("1" if c else "0" for c in ev.correct_mask)}


class World:
    """The bundled model, the shipped expert files and the test examples."""

    def __init__(self, args):
        self.args = args
        self.expert_paths = {f: args.experts / f"{f}.safetensors" for f in TRAIN_FAMILIES}
        self.classifier_path = args.experts / f"{CLASSIFY}.safetensors"
        self.baselines = args.experts / "baselines"
        for p in [*self.expert_paths.values(), self.classifier_path]:
            if not p.exists():
                raise SystemExit(f"missing expert {p}; run with --train or see experts/README.md")

    def patched(self, experts, more: int = 0, model_path: Path | None = None,
                own: bool = False):
        """The tiny model (or the model at ``model_path``, which may take experts made for
        another model unless ``own``) patched with ``experts``, its bank holding ``more``
        besides."""
        model, tok = load_tiny(path=model_path)
        experts = list(experts)
        return t2fast.patch_model(model, experts=experts, backend="torch", progress=False,
                                  allow_other_model=model_path is not None and not own,
                                  max_experts=max(SVFConfig().max_experts,
                                                  len(experts) + more)), tok

    def examples(self, task_name):
        return get_task(task_name).examples("test", self.args.n)

    def eval_model(self, model, tok, task_name):
        return evaluate(model, tok, get_task(task_name), self.examples(task_name),
                        max_new_tokens=max_new_tokens_for(task_name),
                        batch_size=self.args.batch_size)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def label(path_or_dir: Path, objective: str, method: str) -> str:
    cfg = expert_meta(path_or_dir).get("config", {})
    return f"{method} ({objective}, lr {cfg.get('lr', '?'):g})"


def expert_meta(path: Path) -> dict:
    """The training metadata of an SVF expert file or a LoRA folder."""
    if path.is_dir():
        return json.loads((path / "t2fast_meta.json").read_text()).get("extra", {})
    return load_expert(path).extra


def train_family_results(w: World) -> tuple[dict, dict, dict]:
    rows: dict = {f: {} for f in TRAIN_FAMILIES}
    labels = {"base": "base", "svf_rl": label(w.expert_paths[TRAIN_FAMILIES[0]], "RL", "SVF")}
    handle, tok = w.patched(w.expert_paths.values())
    for f in TRAIN_FAMILIES:
        handle.set_mixture(None)
        rows[f]["base"] = record(w.eval_model(handle.model, tok, f))
        handle.set_mixture(f)
        rows[f]["svf_rl"] = record(w.eval_model(handle.model, tok, f))
    params = {"SVF": sum(int(m.rank) for m in handle.modules.values())}
    for f in TRAIN_FAMILIES:
        p = w.baselines / f"svf_sft_{f}.safetensors"
        if p.exists():
            handle, tok = w.patched([p])
            handle.set_mixture(handle.expert_names[0])
            rows[f]["svf_sft"] = record(w.eval_model(handle.model, tok, f))
            labels["svf_sft"] = label(p, "SFT", "SVF")
        for d in sorted(w.baselines.glob(f"lora_*_{f}")):
            from t2fast.train.policy import LoRAPolicy
            key = d.name[:-len(f) - 1]                              # "lora_rl", "lora_sft"
            model, tok = load_tiny()
            pol = LoRAPolicy.load(model, d)
            params.setdefault(f"LoRA (rank {expert_meta(d)['config']['lora_rank']})",
                              sum(v.numel() for n, v in pol.model.named_parameters()
                                  if "lora_" in n))
            labels[key] = label(d, key.split("_")[1].upper(), "LoRA")
            rows[f][key] = record(w.eval_model(pol.model, tok, f))
    return rows, params, labels


def confusion(true: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    idx = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred):
        m[idx[t]][idx.get(p, idx[OTHER])] += 1
    return m


def classification_results(w: World) -> dict:
    handle, tok = w.patched([*w.expert_paths.values(), w.classifier_path])
    families = list(TRAIN_FAMILIES)
    labels = families + [OTHER]
    exs = w.examples(CLASSIFY)
    inner = [e.meta.get("source_family") for e in exs]
    # the inner questions, as pass 1 sees them (the dispatchers build the classify prompt)
    prompts = [e.prompt.replace("Q: classify: ", "Q: ", 1) for e in exs]
    out = {}
    for name, strat in (("prompt", PromptDispatch(handle, tok, families)),
                        ("classifier", ClassifierDispatch(handle, tok, CLASSIFY, families))):
        t0 = time.perf_counter()
        pred = strat.classify(prompts)
        dt = time.perf_counter() - t0
        ok = [p == t for p, t in zip(pred, inner)]
        ev = EvalResult(CLASSIFY, len(ok), sum(ok), len(ok), correct_mask=ok)
        out[name] = {**record(ev), "labels": labels, "confusion": confusion(inner, pred, labels),
                     "seconds": dt}
    return out


def unseen_families() -> list[str]:
    """The held-out families, then the transfer families if the bundled base model was
    pre-trained on them (its training report's mixture names them)."""
    report = json.loads((tiny_model_path() / "training_report.json").read_text())
    return [*HELDOUT_FAMILIES, *(f for f in TRANSFER_FAMILIES if f in report["mixture"])]


def cem_runs(w: World, eng, run, handle, tok, task, shots: int, restated: bool = False,
             **settings) -> list[dict]:
    """One few-shot CEM per seed in ``--cem-seeds`` (seed s: its own search on shot set s),
    each evaluated on the test questions by ``run``. With ``restated`` the shots are restated
    (:func:`t2fast.adapt.restated_examples`) and scored as :func:`t2fast.adapt.restated_task`
    says (``run`` then answers restated test questions), as ``t2fast adapt --restate``
    searches."""
    a = w.args
    runs = []
    for seed in a.cem_seeds:
        cfg = CEMConfig(population=a.cem_population, iterations=a.cem_iterations, seed=seed,
                        **settings)
        exs = fewshot_examples(task, shots, seed)
        if restated:
            exs = restated_examples(handle, tok, exs)
        res = fewshot_cem(handle, tok, restated_task(task) if restated else task, exs, cfg)
        runs.append({"seed": seed, **run(eng, FixedMixture(res.spec, "cem")),
                     "alpha": res.alpha.tolist(), "space": cfg.space,
                     "fewshot_accuracy": res.fewshot_accuracy,
                     "base_fewshot_accuracy": res.base and res.base["accuracy"],
                     "kept_base": res.kept_base, "shots": shots,
                     "check_shots": res.check_shots, "cem_s": res.wall_s,
                     "evaluations": res.evaluations})
    return runs


def variant_runs(w: World, eng, run, handle, tok, task, variant: dict) -> list[dict]:
    """:func:`cem_runs` with the settings of one of :data:`CEM_VARIANTS`."""
    settings = {k: v for k, v in variant.items() if k != "shots"}
    return cem_runs(w, eng, run, handle, tok, task, variant["shots"], **settings)


def runner(w: World, family: str, examples=None, habits: bool = False):
    """``run(engine, strategy)``: a two-pass run on ``examples`` (default: ``family``'s test
    questions) scored by ``family``, as a record with the pass times (and pass 1's picks when
    it picked). With ``habits`` the record adds ``habit``: the share of questions answered
    with the pre-training habit's answer where it differs from the task's
    (``scripts/tiny_habits.py``), and for a two-step family ``restated``: the share whose first
    step is the parent question, exactly."""
    task = get_task(family)
    exs = w.examples(family) if examples is None else examples
    prompts = [e.prompt for e in exs]

    def run(engine, strategy) -> dict:
        r = engine.run(prompts, strategy)
        entry = {**record(score_generations(task, r.outputs, exs)), "pass1_s": r.pass1_s,
                 "pass2_s": r.pass2_s}
        if habits:
            entry["habit"] = sum(answers_with_habit(family, task, g, e)
                                 for g, e in zip(r.outputs, exs)) / len(exs)
            if family in STEP_FAMILIES:
                entry["restated"] = sum(map(restated_right, r.outputs, exs)) / len(exs)
        if r.labels is not None:
            entry["picked"] = dict(Counter(r.labels))
        return entry
    return run


class Dispatchers:
    """The two patched models every dispatch comparison needs: the training families' experts
    (fixed mixtures, prompt dispatch, CEM) and the same plus the classification expert
    (classifier dispatch), on the bundled model with the shipped experts or on the model at
    ``model_path`` with its own (``model_path/experts/``)."""

    def __init__(self, w: World, model_path: Path | None = None):
        paths, classifier = list(w.expert_paths.values()), w.classifier_path
        if model_path is not None:
            paths = [model_path / "experts" / f"{f}.safetensors" for f in TRAIN_FAMILIES]
            classifier = model_path / "experts" / f"{CLASSIFY}.safetensors"
        self.handle, self.tok = w.patched(paths, model_path=model_path, own=True)
        self.handle_c, self.tok_c = w.patched([*paths, classifier], model_path=model_path,
                                              own=True)
        self.batch_size = w.args.batch_size

    def engines(self, family: str) -> tuple[TwoPassEngine, TwoPassEngine]:
        """Two-pass engines over both models with ``family``'s answer budget."""
        mnt = max_new_tokens_for(family)
        return (TwoPassEngine(self.handle, self.tok, max_new_tokens=mnt,
                              batch_size=self.batch_size),
                TwoPassEngine(self.handle_c, self.tok_c, max_new_tokens=mnt,
                              batch_size=self.batch_size))

    def prompt(self) -> PromptDispatch:
        return PromptDispatch(self.handle, self.tok, list(TRAIN_FAMILIES))

    def classifier(self) -> ClassifierDispatch:
        return ClassifierDispatch(self.handle_c, self.tok_c, CLASSIFY, list(TRAIN_FAMILIES))


def heldout_results(w: World, unseen=None, d: Dispatchers | None = None,
                    variants: dict | None = None, habits: bool = False) -> dict:
    """Every strategy on each unseen family in ``unseen`` (default :func:`unseen_families`)
    with the models of ``d`` (default: the bundled model with the shipped experts).
    ``variants``: the CEM variants besides the default (default: :data:`CEM_VARIANTS` unless
    ``--no-cem-variants``); ``habits``: records add the share of habit answers."""
    a = w.args
    if variants is None:
        variants = {} if a.no_cem_variants else CEM_VARIANTS
    d = Dispatchers(w) if d is None else d
    out = {}
    for h in unseen_families() if unseen is None else unseen:
        task, run = get_task(h), runner(w, h, habits=habits)
        eng, eng_c = d.engines(h)
        rec: dict = {"parent": PARENT_FAMILY[h], "kind": FAMILY_KINDS[h]}
        rec["base"] = run(eng, FixedMixture(None, "base"))
        rec["parent_expert"] = run(eng, FixedMixture(PARENT_FAMILY[h], "parent"))
        rec["uniform"] = run(eng, FixedMixture(uniform_alpha(len(TRAIN_FAMILIES)), "uniform"))
        rec["prompt"] = run(eng, d.prompt())
        rec["classifier"] = run(eng_c, d.classifier())
        rec["cem"] = cem_runs(w, eng, run, d.handle, d.tok, task, a.shots)
        if a.per_layer:
            rec["cem_per_layer"] = cem_runs(w, eng, run, d.handle, d.tok, task, a.shots,
                                            per_layer=True)
        for key, v in variants.items():
            rec[key] = variant_runs(w, eng, run, d.handle, d.tok, task, v)
        out[h] = rec
    return out


def truncation_results(w: World) -> dict:
    """Each training family's expert and its truncations (k = r / d for d in DIVISORS) on the
    family's test questions."""
    handle, tok = w.patched(w.expert_paths.values(), more=len(TRAIN_FAMILIES) * len(DIVISORS))
    factors = handle.decomposition.factors
    full = dict(handle.bank.experts)
    handle.add_experts([truncate(full[f], factors, d) for f in TRAIN_FAMILIES for d in DIVISORS])
    out: dict = {"divisors": list(DIVISORS),
                 "bytes_ratio": {str(d): correction_bytes_ratio(factors, d) for d in DIVISORS},
                 "families": {}}
    for f in TRAIN_FAMILIES:
        row = {}
        for d in DIVISORS:
            handle.set_mixture(f"{f}_r{d}")
            row[str(d)] = record(w.eval_model(handle.model, tok, f))
        out["families"][f] = row
    handle.set_mixture(None)
    return out


def surface_results(w: World) -> dict:
    """Every surface variant of every training family (``scripts/surface_variants.py``): the
    base model, the family's expert, prompt dispatch (A) and the classification expert (B)."""
    d = Dispatchers(w)
    out: dict = {}
    for f, variants in VARIANTS.items():
        eng, eng_c = d.engines(f)
        out[f] = {}
        for v, (example, _) in variants.items():
            run = runner(w, f, variant_examples(f, v, w.args.n), habits=True)
            out[f][v] = {"example": example,
                         "base": run(eng, FixedMixture(None, "base")),
                         "parent_expert": run(eng, FixedMixture(f, "parent")),
                         "prompt": run(eng, d.prompt()),
                         "classifier": run(eng_c, d.classifier())}
    return out


def cross_model_results(w: World) -> dict:
    """The shipped experts on the second base model: its base, its own expert (trained on it
    with the same recipe), each shipped expert in every arm of :data:`cross_model.ARMS` (the
    shuffled control once per seed) on its own family, and the default few-shot CEM over the
    shipped experts in σ order (one row per seed), also with its searched shots deciding
    between its best and the base model (:data:`CEM_VARIANTS` ``cem_nocheck``)."""
    folder = ROOT / SECOND_BASE
    report = json.loads((folder / "training_report.json").read_text())
    full = {f: load_expert(p) for f, p in w.expert_paths.items()}
    arms = [reorder(full[f], arm, seed) for f in TRAIN_FAMILIES for arm in ARMS
            for seed in (SHUFFLE_SEEDS if arm == "shuffled" else (0,))]
    own = [dataclasses.replace(load_expert(folder / "experts" / f"{f}.safetensors"),
                               name=f"{f}_own") for f in TRAIN_FAMILIES]
    handle, tok = w.patched([*arms, *own], model_path=folder)
    # CEM searches over the experts in σ order alone (a bank of the three)
    handle_m, tok_m = w.patched([a for a in arms if a.extra["cross_model_arm"] == "matched"],
                                model_path=folder)
    out: dict = {"model": str(SECOND_BASE), "sha256": weights_sha256(folder),
                 "seed": report["args"]["seed"], "steps_run": report["steps_run"],
                 "kept_step": report["kept_step"], "bank": handle_m.expert_names,
                 "shuffle_seeds": list(SHUFFLE_SEEDS), "families": {}}
    for f in TRAIN_FAMILIES:
        mnt, run = max_new_tokens_for(f), runner(w, f)
        eng = TwoPassEngine(handle, tok, max_new_tokens=mnt, batch_size=w.args.batch_size)
        eng_m = TwoPassEngine(handle_m, tok_m, max_new_tokens=mnt, batch_size=w.args.batch_size)
        row = {"base": run(eng, FixedMixture(None, "base")),
               "own": run(eng, FixedMixture(f"{f}_own", "own")),
               "matched": run(eng, FixedMixture(f"{f}_matched", "matched")),
               "reversed": run(eng, FixedMixture(f"{f}_reversed", "reversed")),
               "shuffled": [{"seed": s, **run(eng, FixedMixture(f"{f}_shuffled{s}", "shuffled"))}
                            for s in SHUFFLE_SEEDS],
               "cem": cem_runs(w, eng_m, run, handle_m, tok_m, get_task(f), w.args.shots),
               "cem_nocheck": variant_runs(w, eng_m, run, handle_m, tok_m, get_task(f),
                                           CEM_VARIANTS["cem_nocheck"])}
        out["families"][f] = row
    return out


def transfer_base_results(w: World) -> dict:
    """The transfer base model (pre-trained on the transfer and two-step families, never an
    expert's training data) with its own experts: each training family (base, its expert) and
    every transfer and two-step family (every strategy of :func:`heldout_results`, with the
    default CEM and the one whose searched shots decide; habit shares)."""
    folder = ROOT / TRANSFER_BASE
    report = json.loads((folder / "training_report.json").read_text())
    d = Dispatchers(w, folder)
    train = {}
    for f in TRAIN_FAMILIES:
        d.handle.set_mixture(None)
        train[f] = {"base": record(w.eval_model(d.handle.model, d.tok, f))}
        d.handle.set_mixture(f)
        train[f]["expert"] = record(w.eval_model(d.handle.model, d.tok, f))
    nocheck = {"cem_nocheck": CEM_VARIANTS["cem_nocheck"]}
    return {"model": str(TRANSFER_BASE), "sha256": weights_sha256(folder),
            "steps_run": report["steps_run"], "mixture": report["mixture"],
            "train_families": train,
            "unseen": heldout_results(w, [*TRANSFER_FAMILIES, *STEP_FAMILIES], d, nocheck,
                                      habits=True)}


def restated_results(w: World) -> dict:
    """The transfer base model with its own experts on every transfer and two-step family,
    each test question restated once by the base model (its two-step first line, as
    :class:`t2fast.adapt.Restated` restates in pass 1; :func:`t2fast.adapt.restated_examples`) and then
    answered in its restated prompt: by the base model, the parent family's expert, prompt
    dispatch (A), the classification expert (B) and few-shot CEM on restated shots (one row per
    seed); the share of right restatements and the restatement's wall time; and the base model
    on the questions as asked."""
    d = Dispatchers(w, ROOT / TRANSFER_BASE)
    out: dict = {"model": str(TRANSFER_BASE), "families": {}}
    for h in (*TRANSFER_FAMILIES, *STEP_FAMILIES):
        parent, exs = PARENT_FAMILY[h], w.examples(h)
        eng, eng_c = d.engines(h)
        t0 = time.perf_counter()
        restated = restated_examples(d.handle, d.tok, exs)
        restate_s = time.perf_counter() - t0
        wanted = [get_task(parent).question_of(e.meta) for e in exs]
        run = runner(w, h, restated)
        out["families"][h] = {
            "parent": parent, "kind": FAMILY_KINDS[h],
            "base": runner(w, h)(eng, FixedMixture(None, "base")),
            "restated_right": sum(e.question == q for e, q in zip(restated, wanted)) / len(exs),
            "restate_s": restate_s,
            "restated_base": run(eng, FixedMixture(None, "base")),
            "restated_parent_expert": run(eng, FixedMixture(parent, "parent")),
            "restated_prompt": run(eng, d.prompt()),
            "restated_classifier": run(eng_c, d.classifier()),
            "restated_cem": cem_runs(w, eng, run, d.handle, d.tok, get_task(h), w.args.shots,
                                     restated=True)}
    return out


def expert_info(w: World) -> tuple[dict, dict]:
    """Training facts of every shipped expert and baseline (from their metadata)."""
    info, checkpoints = {}, {}
    paths = [*w.expert_paths.values(), w.classifier_path,
             *sorted(w.baselines.glob("svf_sft_*.safetensors")),
             *sorted(d for d in w.baselines.glob("lora_*") if d.is_dir())]
    for p in paths:
        e = expert_meta(p)
        cfg = e.get("config", {})
        log = Path(str(p) + ".log.jsonl")
        done = read_log(log).get("done", []) if log.exists() else []
        checkpoints[w.rel(p)] = {"best_step": e.get("best_step")}
        info[w.rel(p)] = {
            "objective": cfg.get("objective"), "best_step": e.get("best_step"),
            "steps_run": done[-1]["steps_run"] if done else None,
            "validation_accuracy": e.get(f"{cfg.get('eval_split', 'validation')}_accuracy"),
            **{k: cfg.get(k) for k in ("lr", "kl_coef", "baseline", "temperature",
                                       "batch_size", "samples_per_prompt", "seed")}}
    return info, checkpoints


def train_all(jobs: int = 1) -> None:
    """Run every recipe (``jobs`` at a time, one process each) from the repository root, so
    that the outputs, their logs and the commands stored in the expert files carry
    repository-relative paths."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def run(item):
        out, argv = item
        for stale in (out + ".log.jsonl", out + ".state.pt"):
            (ROOT / stale).unlink(missing_ok=True)  # a fresh run: no log or checkpoint of another
        print(f"t2fast train --out {out} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "t2fast", "train", "--out", out, *argv,
                               "--no-progress"], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"training {out} failed (exit code {done.returncode}):\n"
                             f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        print(f"{out}: {time.perf_counter() - t0:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, RECIPES.items()))


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "README.md").write_text(render(results))


#: The measured sections, in measuring order: key -> (what it measures, measure(world) -> the
#: entries it writes into results.json).
SECTIONS = {
    "train_families": ("training families", lambda w: dict(zip(
        ("train_families", "parameters", "column_labels"), train_family_results(w)))),
    "classification": ("classification", lambda w: {"classification": classification_results(w)}),
    "heldout": ("unseen families", lambda w: {"heldout": heldout_results(w)}),
    "truncated": ("truncated experts", lambda w: {"truncated": truncation_results(w)}),
    "surface": ("surface variants", lambda w: {"surface": surface_results(w)}),
    "cross_model": ("cross-model transfer", lambda w: {"cross_model": cross_model_results(w)}),
    "transfer_base": ("transfer families on a base pre-trained on them",
                      lambda w: {"transfer_base": transfer_base_results(w)}),
    "restated": ("questions restated before dispatch",
                 lambda w: {"restated": restated_results(w)}),
}


def machine(args) -> str:
    """The machine and settings the timings depend on."""
    return f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}"


#: Settings that only some sections use: --only may change them with all of those sections.
SECTION_SETTINGS = {"cem_variants": {"heldout", "cross_model", "transfer_base"},
                    "per_layer": {"heldout", "transfer_base"}}


def run_args(args) -> dict:
    """The settings every section is measured with (``results.json``'s ``args``)."""
    return {"n": args.n, "shots": args.shots, "cem_seeds": args.cem_seeds,
            "cem_variants": {} if args.no_cem_variants else CEM_VARIANTS,
            "cem_iterations": args.cem_iterations, "cem_population": args.cem_population,
            "per_layer": args.per_layer}


def previous_results(args) -> dict:
    """The results.json that ``--only`` updates; its sections must have been measured with
    the settings given now."""
    path = args.out / "results.json"
    if args.train:
        raise SystemExit("--only re-measures the shipped experts; it cannot be combined with "
                         "--train (retrain, then measure every section)")
    if not path.exists():
        raise SystemExit(f"--only updates {path}, which does not exist: measure every section "
                         f"first")
    old = json.loads(path.read_text())
    now = run_args(args)
    differ = [k for k, v in now.items() if json.loads(json.dumps(v)) != old["args"].get(k)]
    stale = [k for k in differ if not SECTION_SETTINGS.get(k, set(SECTIONS)) <= set(args.only)]
    if stale:
        raise SystemExit(f"--only: {path} was measured with other settings ({', '.join(stale)}"
                         f"); give the same ones, or measure every section")
    old["args"].update({k: now[k] for k in differ})     # every section using them re-measured
    return old


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        (args.out / "README.md").write_text(render(json.loads(
            (args.out / "results.json").read_text())))
        return 0
    results = previous_results(args) if args.only else None
    torch.set_num_threads(args.threads)
    if args.train:
        t0 = time.perf_counter()
        train_all(args.jobs)
        print(f"training took {time.perf_counter() - t0:.0f} s", flush=True)
    w = World(args)
    if results is None:
        words = list(argv if argv is not None else sys.argv[1:])
        if "--jobs" in words:                      # how the experts were trained, not measured
            i = words.index("--jobs")
            del words[i:i + 2]
        flags = " ".join(a for a in words if a != "--train")
        results = {"args": {**run_args(args), "command_flags": (" " + flags) if flags else ""},
                   "machine": machine(args), "bank": list(TRAIN_FAMILIES), "section_s": {}}
    seconds = results.setdefault("section_s", {})
    t_all = time.perf_counter()
    for key, (what, measure) in SECTIONS.items():
        if args.only and key not in args.only:
            continue
        print(f"{what} ...", flush=True)
        t0 = time.perf_counter()
        results.update(measure(w))
        seconds[key] = time.perf_counter() - t0
    results["experts"], results["checkpoints"] = expert_info(w)
    if args.only:               # the full run's total stays; these sections came later
        results["remeasured"] = sorted(set(results.get("remeasured", [])) | set(args.only))
        results.setdefault("section_machine", {}).update({k: machine(args) for k in args.only})
    else:
        results["wall_s"] = time.perf_counter() - t_all
        results.pop("remeasured", None)
        results.pop("section_machine", None)
    write(results, args.out)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
