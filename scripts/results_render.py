"""Render ``results/README.md`` from ``results/results.json`` (no model, no measurement).

Everything in the README is derived here from the measurements stored in the JSON: accuracies
with Wilson intervals, and every paired comparison (both systems scored on the same test
questions, whose per-example correctness the JSON keeps as a string of 0/1) with its exact
McNemar p-value. ``scripts/make_results.py`` writes the JSON and calls :func:`render`;
``tests/test_results.py`` checks that the committed README is exactly ``render(results.json)``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t2fast.train.evaluate import mcnemar_exact  # noqa: E402

#: Significance levels reported by the verdicts (unadjusted for the number of comparisons).
ALPHA, STRONG = 0.05, 0.01
#: Base greedy accuracy wanted on each training family (reward signal and room for RL).
BAND = (0.30, 0.60)
#: Base greedy accuracy wanted on each held-out family.
HELDOUT_MIN = 0.10
HELDOUT_ROWS = (("base", "base"), ("parent_expert", "parent expert"), ("uniform", "uniform α"),
                ("prompt", "prompt dispatch (A)"), ("classifier", "classification expert (B)"))
#: Share of an unseen family's questions pass 1 should route to its parent family.
ROUTING_MIN = 0.80
#: The systems measured on each surface variant: key -> label.
SURFACE_ROWS = tuple(row for row in HELDOUT_ROWS if row[0] != "uniform")
#: The arms of the cross-model section: key -> label.
CROSS_BASE, CROSS_OWN = "second model's base", "second model's own expert"
CROSS_ARMS = {"matched": "experts in σ order", "reversed": "σ order reversed",
              "shuffled": "shuffled z"}
#: Where-suffix of the cross-model rows (section 3d).
SECOND = " (second model)"
#: Where-suffix and expert label of the transfer base model's rows (section 3e).
TB, TB_EXPERT = " (transfer base)", "its own expert"
#: The strategies of section 3f, each after a restatement of the question: key -> label.
RESTATED = {"restated_base": "restated, base model",
            "restated_parent_expert": "restated, parent expert",
            "restated_prompt": "restated, prompt dispatch (A)",
            "restated_classifier": "restated, classification expert (B)"}
#: Section 3f's CEM runs: key -> label.
RESTATED_CEM = {"restated_cem": "restated, CEM"}
#: The CEM runs of an unseen family's record: key -> label (the default first).
CEM_LABELS = {"cem": "CEM", "cem_per_layer": "per-layer CEM",
              "cem_acc5": "CEM (accuracy, 5 shots, absolute)",
              "cem_ll5": "CEM (likelihood, 5 shots, absolute)",
              "cem_ll20": "CEM (likelihood, 20 shots, absolute)",
              "cem_res20": "CEM (likelihood, 20 shots, residual)",
              "cem_nocheck": "CEM (the searched 20 shots decide)"}


def fmt(rec: dict | None) -> str:
    """'0.412 [0.369, 0.456]': accuracy and Wilson 95% interval."""
    if rec is None:
        return "—"
    lo, hi = rec["ci95"]
    return f"{rec['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def mask(rec: dict) -> list[bool]:
    return [c == "1" for c in rec["correct_mask"]]


def compare(where: str, a_name: str, a: dict, b_name: str, b: dict) -> dict:
    """One paired comparison of system a against system b on the same examples."""
    t = mcnemar_exact(mask(a), mask(b))
    # from the counts, so that a difference of exactly 25 of 500 is 0.05 (0.45 - 0.40 is not)
    diff = (t["a_only"] - t["b_only"]) / len(mask(a))
    if t["p"] < ALPHA:
        verdict = ("higher" if diff > 0 else "lower") + (" (p < 0.01)" if t["p"] < STRONG
                                                         else " (p < 0.05)")
    else:
        verdict = "no significant difference"
    return {"where": where, "a": a_name, "b": b_name, "acc_a": a["accuracy"],
            "acc_b": b["accuracy"], "diff": diff, **t, "verdict": verdict}


def comparisons(results: dict) -> list[dict]:
    """Every paired comparison the README lists, in a fixed order."""
    out = []
    labels = results["column_labels"]
    for f, row in results["train_families"].items():
        others = [k for k in labels if k != "base" and k in row]
        for k in others:
            out.append(compare(f, labels[k], row[k], "base", row["base"]))
        for k in others:
            if k != "svf_rl" and "svf_rl" in row:
                out.append(compare(f, labels["svf_rl"], row["svf_rl"], labels[k], row[k]))
    out += unseen_comparisons(results["heldout"])
    c = results["classification"]
    out.append(compare("classify (pass 1)", "classification expert (B)", c["classifier"],
                       "prompt (A)", c["prompt"]))
    tr = results.get("truncated")
    if tr:
        labels = results["column_labels"]
        for f, row in tr["families"].items():
            full = results["train_families"][f]
            for d in tr["divisors"]:
                name = f"truncated k = r/{d}"
                out.append(compare(f, name, row[str(d)], labels["svf_rl"], full["svf_rl"]))
                out.append(compare(f, name, row[str(d)], "base", full["base"]))
    for f, variants in results.get("surface", {}).items():
        for v, r in variants.items():
            for key, name in SURFACE_ROWS[1:]:
                out.append(compare(f"{f}: {v}", name, r[key], "base", r["base"]))
    cm = results.get("cross_model")
    for f, row in (cm or {}).get("families", {}).items():
        where, base = f + SECOND, row["base"]
        shuffled = [(f"{CROSS_ARMS['shuffled']} seed {r['seed']}", r) for r in row["shuffled"]]
        out.append(compare(where, CROSS_OWN, row["own"], CROSS_BASE, base))
        out.append(compare(where, CROSS_ARMS["matched"], row["matched"], CROSS_OWN, row["own"]))
        for name, rec in [(CROSS_ARMS["matched"], row["matched"]),
                          (CROSS_ARMS["reversed"], row["reversed"]), *shuffled,
                          *((f"CEM seed {r['seed']}", r) for r in row["cem"]),
                          *((f"{CEM_LABELS['cem_nocheck']} seed {r['seed']}", r)
                            for r in row.get("cem_nocheck", []))]:
            out.append(compare(where, name, rec, CROSS_BASE, base))
        for name, rec in [(CROSS_ARMS["reversed"], row["reversed"]), *shuffled]:
            out.append(compare(where, CROSS_ARMS["matched"], row["matched"], name, rec))
    tb = results.get("transfer_base")
    if tb:
        for f, row in tb["train_families"].items():
            out.append(compare(f + TB, TB_EXPERT, row["expert"], "base", row["base"]))
        out += unseen_comparisons(tb["unseen"], TB)
    for f, r in results.get("restated", {}).get("families", {}).items():
        where, b = f + TB, RESTATED["restated_classifier"]
        out += [compare(where, name, r[key], "base", r["base"]) for key, name in RESTATED.items()]
        out.append(compare(where, b, r["restated_classifier"], RESTATED["restated_base"],
                           r["restated_base"]))
        if tb and f in tb["unseen"]:
            out.append(compare(where, b, r["restated_classifier"], "classification expert (B)",
                               tb["unseen"][f]["classifier"]))
        for run in r.get("restated_cem", []):
            name = f"{RESTATED_CEM['restated_cem']} seed {run['seed']}"
            out.append(compare(where, name, run, "base", r["base"]))
            out.append(compare(where, name, run, RESTATED["restated_base"], r["restated_base"]))
            out.append(compare(where, name, run, b, r["restated_classifier"]))
    return out


def unseen_comparisons(ho: dict, suffix: str = "") -> list[dict]:
    """The comparisons on unseen families ``ho`` (family -> record of every strategy), each
    where = family + ``suffix``: every strategy against base, the dispatchers against uniform
    α and each other, the default CEM against every other strategy, its variants against
    base."""
    out = []
    names = dict(HELDOUT_ROWS)
    for h, r in ho.items():
        where = h + suffix
        for key, name in HELDOUT_ROWS[1:]:
            out.append(compare(where, name, r[key], "base", r["base"]))
        for key in ("prompt", "classifier"):
            out.append(compare(where, names[key], r[key], names["uniform"], r["uniform"]))
        out.append(compare(where, names["classifier"], r["classifier"], names["prompt"],
                           r["prompt"]))
        for key, label in CEM_LABELS.items():
            # the default CEM against every other strategy; its ablations against base
            others = ["base"] if key.startswith("cem_") else ["base", "uniform", "prompt",
                                                                  "classifier"]
            for run in r.get(key, []):
                name = f"{label} seed {run['seed']}"
                for other in others:
                    out.append(compare(where, name, run, names[other], r[other]))
    return out


def identity_notes(results: dict) -> list[str]:
    out = []
    for name, info in results["checkpoints"].items():
        if info.get("best_step") == 0:
            out.append(f"`{name}` is the identity: no evaluation during training beat step 0 "
                       f"on the validation split, so its best checkpoint is its initialisation "
                       f"(z = 1 for SVF, B = 0 for LoRA) and it answers exactly like the base "
                       f"model.")
    return out


def train_table(results: dict) -> list[str]:
    labels = results["column_labels"]
    cols = list(labels)
    L = ["| family | " + " | ".join(labels[k] for k in cols) + " |",
         "|---|" + "---|" * len(cols)]
    for f, row in results["train_families"].items():
        L.append(f"| {f} | " + " | ".join(fmt(row.get(k)) for k in cols) + " |")
    p = results["parameters"]
    L += ["", "Trainable parameters: " + "; ".join(f"{k} {v:,}" for k, v in p.items()) + "."]
    return L


def alpha_text(al: list) -> str:
    """α of a CEM run: K weights, or the layer mean of a per-layer α."""
    if not isinstance(al[0], list):
        return ", ".join(f"{v:+.2f}" for v in al)
    return f"{len(al)}×{len(al[0])} (layer mean: " + ", ".join(
        f"{sum(row[k] for row in al) / len(al):+.2f}" for k in range(len(al[0]))) + ")"


def routed(rec: dict, parent: str) -> float:
    """Share of the questions pass 1 sent to ``parent``."""
    return rec["picked"].get(parent, 0) / rec["n"]


def cem_row(where: str, label: str, run: dict, shots: int) -> str:
    """One CEM run: | where | label | seed | shots | α | few-shot acc (base) | test acc | s |;
    shots as 'searched + held out to decide' when some were held out."""
    base_fs = run.get("base_fewshot_accuracy")
    fs = f"{run['fewshot_accuracy']:.2f}" + ("" if base_fs is None else f" ({base_fs:.2f})")
    shown = "base kept" if run.get("kept_base") else f"({alpha_text(run['alpha'])})"
    n, held = run.get("shots", shots), run.get("check_shots", 0)
    return (f"| {where} | {label} | {run['seed']} | {f'{n - held} + {held}' if held else n} | "
            f"{shown} | {fs} | {fmt(run)} | {run['cem_s']:.1f} |")


def strategy_table(ho: dict, habits: bool = False) -> list[str]:
    """| family | kind | every strategy of HELDOUT_ROWS | with ``habits``: the habit's answers
    and (two-step families) the right restatements, base → parent expert |"""
    def shares(key: str, r: dict) -> str:
        if key not in r["base"]:
            return "—"
        return f"{r['base'][key]:.3f} → {r['parent_expert'][key]:.3f}"
    L = ["| family | kind | " + " | ".join(n for _, n in HELDOUT_ROWS)
         + (" | habit's answer: base → parent expert | first step right: base → parent expert"
            if habits else "") + " |",
         "|---|---|" + "---|" * (len(HELDOUT_ROWS) + 2 * habits)]
    for h, r in ho.items():
        L.append(f"| {h} | {r.get('kind', 'held out')} | "
                 + " | ".join(fmt(r[k]) for k, _ in HELDOUT_ROWS)
                 + (f" | {shares('habit', r)} | {shares('restated', r)}" if habits else "")
                 + " |")
    return L + ["", "Parent expert: the training family each unseen family resembles ("
                + ", ".join(f"{h} → {r['parent']}" for h, r in ho.items()) + ")."]


def cem_table(ho: dict, shots: int, labels: dict = CEM_LABELS) -> list[str]:
    L = ["| family | CEM | seed | shots | α | few-shot acc (base) | test acc | search (s) |",
         "|---|---|---|---|---|---|---|---|"]
    for h, r in ho.items():
        for key, label in labels.items():
            L += [cem_row(h, label, run, shots) for run in r.get(key, [])]
    return L


def routing_table(ho: dict) -> list[str]:
    L = [f"Routed: the share sent to the parent family's expert (wanted: ≥ {ROUTING_MIN:.0%}).",
         "", "| family | strategy | routed to parent | picked |", "|---|---|---|---|"]
    for h, r in ho.items():
        for s in ("prompt", "classifier"):
            picked = ", ".join(f"{k}: {v}" for k, v in sorted(r[s]["picked"].items()))
            L.append(f"| {h} | {s} | {routed(r[s], r['parent']):.3f} | {picked} |")
    return L


def heldout_tables(results: dict) -> list[str]:
    ho = results["heldout"]
    a = results["args"]
    L = strategy_table(ho)
    if not any(r.get("kind") == "transfer" for r in ho.values()):
        L += ["", "No transfer family is measured here: the bundled base model was not "
              "pre-trained on them. " + ("Section 3e measures them on a base model that was."
                                         if results.get("transfer_base") else
                                         "They are measured once one that was is shipped "
                                         "(`t2fast/assets/tiny_llama/README.md`, \"Transfer "
                                         "families\").")]
    L += ["",
          "### Few-shot CEM, one row per seed", "",
          f"Seed s draws its own few-shot examples (block s of the validation split, blocks of "
          f"the run's shot count) and runs its own search (population {a['cem_population']}, "
          f"{a['cem_iterations']} iterations); `t2fast adapt --strategy cem --seed s --shots "
          f"{a['shots']}` reproduces a row of the default CEM. The default searches residual α "
          f"(z' = 1 + Σ α_k (z_k − 1): α = 0 is the base model) from the base model, ranking "
          f"members by the likelihood of the correct answers on the first half of its "
          f"{a['shots']} shots; the last half, which the search never saw, alone decide "
          f"whether its best replaces the base model (by likelihood, at no loss of few-shot "
          f"accuracy; the few-shot accuracies are theirs). The ablations change "
          f"one thing at a time from the earlier search (greedy accuracy on 5 shots, ties "
          f"broken by likelihood, absolute α z' = Σ α_k z_k from uniform 1/K, best member "
          f"always kept) towards the default; *the searched shots decide* is the default "
          f"searching on all its shots, which also decide (few-shot accuracies on them). Shots: "
          f"searched + held out to decide. Bank order: " + ", ".join(results["bank"]) + ".", ""]
    L += cem_table(ho, a["shots"])
    L += ["", "### Experts picked in pass 1 on the unseen families", ""]
    L += routing_table(ho)
    L += ["", "### Pass-1 / pass-2 wall time (s) on the unseen test sets", "",
          "| family | strategy | pass 1 | pass 2 |", "|---|---|---|---|"]
    for h, r in ho.items():
        for s in ("base", "uniform", "prompt", "classifier"):
            L.append(f"| {h} | {s} | {r[s]['pass1_s']:.2f} | {r[s]['pass2_s']:.2f} |")
    return L


def transfer_base_intro(results: dict) -> str:
    tb = results["transfer_base"]
    return (f"The transfer families need a base model that knows them: `{tb['model']}` is the "
            f"bundled model pre-trained further ({tb['steps_run']} steps in its last run; "
            f"weights sha256 `{tb['sha256'][:12]}…`; its README has every run) with the transfer "
            "families and the two-step families in its pre-training mixture (train split), and "
            "its own experts and classification expert trained on it with the shipped RL recipe "
            "(`experts/` of that folder): no expert saw a transfer or two-step question. A "
            "*transfer* family asks a training family's question in other words and is answered "
            "directly; a *two-step* family asks the same words behind `step by step:` and is "
            "answered by first writing the parent family's own question, then its answer "
            "(`t2fast/tasks/steps.py`; only the final answer is scored). Habit's answer: the "
            "share of questions answered with the pre-training habit's answer, by the base "
            "model and by the parent family's expert.")


def transfer_base_tables(results: dict) -> list[str]:
    tb = results["transfer_base"]
    L = [f"| training family | base | {TB_EXPERT} |", "|---|---|---|"]
    L += [f"| {f} | {fmt(row['base'])} | {fmt(row['expert'])} |"
          for f, row in tb["train_families"].items()]
    L += [""] + strategy_table(tb["unseen"], habits=True)
    L += ["", "Few-shot CEM over its own experts (the default and the one whose searched shots "
          "decide, as in section 2), one row per seed:", ""]
    L += cem_table(tb["unseen"], results["args"]["shots"])
    L += [""] + routing_table(tb["unseen"])
    return L


def restated_intro(results: dict) -> str:
    return ("The transfer base of section 3e with its own experts, each transfer and two-step "
            "question first *restated*: the base model is asked the question behind `step by "
            "step:` (a two-step question as it is) and its first line, the question as its "
            "parent training family asks it, replaces the question; the strategy then picks the "
            "mixture for the restated question and pass 2 answers it in its own prompt "
            "(`t2fast.adapt.Restated`, `t2fast adapt --restate`, `t2fast serve --restate`; a "
            "question without a first line is answered as asked). "
            "No expert saw a transfer or two-step question; the restatement is the base model's "
            "own, learnt in pre-training. Base (as asked): the base model on the question as "
            "asked (section 3e's base). First step right: the share of restatements that are "
            "exactly the parent family's question. Routed: the share pass 1 sends to the parent "
            "family's expert after the restatement.")


def restated_table(results: dict) -> list[str]:
    rs = results["restated"]["families"]
    L = ["| family | kind | base (as asked) | first step right | " + " | ".join(RESTATED.values())
         + " | routed to parent (A / B) |", "|---|---|---|---|" + "---|" * (len(RESTATED) + 1)]
    for h, r in rs.items():
        L.append(f"| {h} | {r['kind']} | {fmt(r['base'])} | "
                 f"{r['restated_right']:.3f} | "
                 + " | ".join(fmt(r[k]) for k in RESTATED)
                 + f" | {routed(r['restated_prompt'], r['parent']):.3f} / "
                   f"{routed(r['restated_classifier'], r['parent']):.3f} |")
    if any(r.get("restated_cem") for r in rs.values()):
        L += ["", "Few-shot CEM after restatement (the default CEM of section 2 over the same "
              "experts): each shot restated like the test questions and scored as its parent "
              "family's question with its final answer, then the restated test questions "
              "answered with the α found (`t2fast adapt --strategy cem --restate`); one row "
              "per seed:", ""]
        L += cem_table(rs, results["args"]["shots"], RESTATED_CEM)
    return L


def truncation_table(results: dict) -> list[str]:
    tr = results["truncated"]
    ds = tr["divisors"]
    L = ["| family | base | full expert | " + " | ".join(f"k = r/{d}" for d in ds) + " |",
         "|---|---|---|" + "---|" * len(ds)]
    for f, row in tr["families"].items():
        full = results["train_families"][f]
        L.append(f"| {f} | {fmt(full['base'])} | {fmt(full['svf_rl'])} | "
                 + " | ".join(fmt(row[str(d)]) for d in ds) + " |")
    L.append("| bytes of W + rank-k correction / W | 1 | — | "
             + " | ".join(f"{tr['bytes_ratio'][str(d)]:.2f}" for d in ds) + " |")
    return L


def surface_table(results: dict) -> list[str]:
    L = ["| family | variant | example | " + " | ".join(n for _, n in SURFACE_ROWS)
         + " | habit's answer: base → expert | routed to parent (A / B) |",
         "|---|---|---|" + "---|" * (len(SURFACE_ROWS) + 2)]
    for f, variants in results["surface"].items():
        for v, r in variants.items():
            L.append(f"| {f} | {v} | `{r['example']}` | "
                     + " | ".join(fmt(r[k]) for k, _ in SURFACE_ROWS)
                     + f" | {r['base']['habit']:.3f} → {r['parent_expert']['habit']:.3f} "
                     f"| {routed(r['prompt'], f):.3f} / {routed(r['classifier'], f):.3f} |")
    return L


def surface_gains(results: dict, rows: list[dict]) -> list[str]:
    """Surface variants on which the classification expert beats base by ≥ 5 points, p < 0.01."""
    wins = [c["where"] for c in rows if c["a"] == dict(SURFACE_ROWS)["classifier"]
            and c["b"] == "base" and ": " in c["where"] and c["diff"] >= 0.05
            and c["p"] < STRONG and not c["where"].endswith(": as trained")]
    n = sum(len(v) - ("as trained" in v) for v in results["surface"].values())
    return [f"Near transfer, for comparison (section 3c: surface variants, never pre-trained "
            f"on, so not transfer families in the sense above): the classification expert beats "
            f"base by ≥ +0.05 with p < 0.01 on {len(wins)} of {n} variants"
            + (f" ({', '.join(wins)})" if wins else "") + "."]


def cross_model_lines(results: dict, rows: list[dict]) -> list[str]:
    """Cross-model transfer in one line per question: does an expert gain on the second model,
    and does the σ order matter (in σ order against reversed and shuffled)?"""
    by = {(c["where"], c["a"], c["b"]): c for c in rows}
    fams = list(results["cross_model"]["families"])

    def diffs(a, b):
        cs = [by[(f + SECOND, a, b)] for f in fams]
        return ", ".join(f"{f} {c['diff']:+.3f} (p = {c['p']:.2g})" for f, c in zip(fams, cs))
    order = [c for c in rows if c["where"].endswith(SECOND)
             and c["a"] == CROSS_ARMS["matched"] and c["b"] not in (CROSS_BASE, CROSS_OWN)]
    higher = sum(c["verdict"].startswith("higher") for c in order)

    def below(prefix):
        cs = [c for c in rows if c["where"].endswith(SECOND) and c["b"] == CROSS_BASE
              and c["a"].startswith(prefix)]
        return f"{sum(c['verdict'].startswith('lower') for c in cs)} of {len(cs)}"
    return [f"Cross-model transfer (section 3d; no target): the first model's experts in σ order "
            f"against the second model's base: {diffs(CROSS_ARMS['matched'], CROSS_BASE)}; the "
            f"second model's own experts: {diffs(CROSS_OWN, CROSS_BASE)}. In σ order against "
            f"reversed or shuffled z: higher in {higher} of {len(order)} comparisons. CEM seeds "
            f"below the second model's base (p < {ALPHA}): {below('CEM seed')} (default), "
            f"{below(CEM_LABELS['cem_nocheck'] + ' seed')} (the searched shots deciding)."]


def cross_model_tables(results: dict) -> list[str]:
    cm, first = results["cross_model"], results["train_families"]
    labels = results["column_labels"]
    seeds = cm["shuffle_seeds"]
    L = ["| family | first model: base | first model: expert | second model: base | "
         f"second model: own expert | {CROSS_ARMS['matched']} | {CROSS_ARMS['reversed']} | "
         + " | ".join(f"{CROSS_ARMS['shuffled']} seed {s}" for s in seeds) + " |",
         "|---|---|---|---|---|---|---|" + "---|" * len(seeds)]
    for f, row in cm["families"].items():
        L.append(f"| {f} | {fmt(first[f]['base'])} | {fmt(first[f]['svf_rl'])} | "
                 f"{fmt(row['base'])} | {fmt(row['own'])} | {fmt(row['matched'])} | "
                 f"{fmt(row['reversed'])} | "
                 + " | ".join(fmt(r) for r in row["shuffled"]) + " |")
    L += ["", f"First model: expert = {labels['svf_rl']} on the bundled model (section 1). "
          f"Own expert: the second model's, trained on it with the same recipe "
          f"(`{cm['model']}/experts/`). "
          f"Few-shot CEM on the second model over the experts in σ order (bank: "
          + ", ".join(cm["bank"]) + "; the default CEM of section 2, one row per seed):", "",
          "| family | CEM | seed | shots | α | few-shot acc (base) | test acc | search (s) |",
          "|---|---|---|---|---|---|---|---|"]
    for f, row in cm["families"].items():
        for key in ("cem", "cem_nocheck"):
            L += [cem_row(f, CEM_LABELS[key], run, results["args"]["shots"])
                  for run in row.get(key, [])]
    return L


def classification_tables(results: dict) -> list[str]:
    L = []
    for s, r in results["classification"].items():
        labels = r["labels"]
        L += [f"**{s}**: accuracy {fmt(r)}", "",
              "| true \\ predicted | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
        L += [f"| {lab} | " + " | ".join(str(v) for v in row) + " |"
              for lab, row in zip(labels, r["confusion"])]
        L.append("")
    return L


def comparison_table(rows: list[dict]) -> list[str]:
    L = ["| where | A | B | acc A | acc B | A − B | A only | B only | p | A vs B |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        L.append(f"| {c['where']} | {c['a']} | {c['b']} | {c['acc_a']:.3f} | {c['acc_b']:.3f} "
                 f"| {c['diff']:+.3f} | {c['a_only']} | {c['b_only']} | {c['p']:.2g} | "
                 f"{c['verdict']} |")
    return L


def target_lines(results: dict, rows: list[dict]) -> list[str]:
    """The project's quality targets, checked: base accuracy of each training family inside
    BAND (signal and room for RL) and of each held-out family above HELDOUT_MIN, SVF (RL) at
    least 10 points above the base model with p < 0.01."""
    out = []
    lo, hi = BAND
    for f, row in results["train_families"].items():
        acc = row["base"]["accuracy"]
        out.append(f"Base model on {f}: {acc:.3f}; target ({lo:.2f}–{hi:.2f}) "
                   + ("met." if lo <= acc <= hi else "NOT met."))
    for h, r in results["heldout"].items():
        acc = r["base"]["accuracy"]
        out.append(f"Base model on the {r.get('kind', 'held out')} {h}: {acc:.3f}; target "
                   f"(above {HELDOUT_MIN:.2f}) " + ("met." if acc > HELDOUT_MIN else "NOT met."))
    labels = results["column_labels"]
    for c in rows:
        if c["a"] == labels.get("svf_rl") and c["b"] == "base":
            met = c["diff"] >= 0.10 and c["p"] < STRONG
            out.append(f"SVF (RL) on {c['where']}: {c['diff']:+.3f} against the base model, "
                       f"p = {c['p']:.2g}: target (≥ +0.10 with p < 0.01) "
                       + ("met." if met else "NOT met."))
    out += unseen_target_lines(results["heldout"], rows)
    if results.get("transfer_base"):
        out += unseen_target_lines(results["transfer_base"]["unseen"], rows, TB)
    if results.get("restated"):
        out += restated_target_lines(results["restated"]["families"], rows)
    return out


def restated_target_lines(rs: dict, rows: list[dict]) -> list[str]:
    """The routing and classifier targets on the families ``rs`` of section 3f, met by the
    dispatchers after a restatement of each question."""
    out, by = [], {(c["where"], c["a"], c["b"]): c for c in rows}
    for h, r in rs.items():
        for key in ("restated_prompt", "restated_classifier"):
            out.append(routing_target_line(RESTATED[key][len("restated, "):],
                                           f"the restated {h}{TB}", r, key))
    wins = []
    for h, r in rs.items():
        line, met = classifier_target_line(by[(h + TB, RESTATED["restated_classifier"], "base")],
                                           f"after restatement on the {r['kind']} family {h}{TB}")
        wins += [h] if met else []
        out.append(line)
    out.append(f"Classification expert (B) after restatement ≥ +0.05 above base with p < 0.01 on "
               f"{len(wins)} of {len(rs)} transfer and two-step families{TB}; target (≥ 3) "
               + ("met." if len(wins) >= 3 else "NOT met."))
    if any(r.get("restated_cem") for r in rs.values()):
        out += cem_target_lines(rs, by, TB, "CEM after restatement", " after restatement",
                                RESTATED_CEM["restated_cem"],
                                (ho_acc(rs, "restated_prompt"), ho_acc(rs, "restated_classifier")),
                                "restated_cem", own=(RESTATED["restated_base"],
                                                     "the base model on the restated questions"))
    return out


def unseen_target_lines(ho: dict, rows: list[dict], suffix: str = "") -> list[str]:
    """The targets on the unseen families ``ho`` (rows where = family + ``suffix``): pass 1
    routes transfer (and two-step) families to their parent, the classification expert beats
    base on them, no CEM seed is significantly below base, CEM beats base on them, and the
    order prompt ≤ classifier ≤ CEM."""
    out = []
    by = {(c["where"], c["a"], c["b"]): c for c in rows}
    names = dict(HELDOUT_ROWS)
    transfer = [h for h, r in ho.items() if r.get("kind") in ("transfer", "two-step")]
    for h in transfer:
        r = ho[h]
        out += [routing_target_line(names[s], h + suffix, r, s) for s in ("prompt", "classifier")]
        out.append(classifier_target_line(by[(h + suffix, names["classifier"], "base")],
                                          f"on the {r['kind']} family {h}{suffix}")[0])
    out += cem_target_lines(ho, by, suffix, "Default CEM", "", "CEM",
                            (ho_acc(ho, "prompt"), ho_acc(ho, "classifier")), "cem")
    return out


def routing_target_line(label: str, what: str, r: dict, key: str) -> str:
    """The routing target of dispatcher ``label`` (runs ``r[key]``) on ``what``: the share it
    sends to the family's parent ``r["parent"]``."""
    share = routed(r[key], r["parent"])
    return (f"{label} routes {what} to {r['parent']}: {share:.3f}; target "
            f"(≥ {ROUTING_MIN:.2f}) " + ("met." if share >= ROUTING_MIN else "NOT met."))


def classifier_target_line(c: dict, where: str) -> tuple[str, bool]:
    """(line, met) of the classifier target (≥ +0.05 above base with p < 0.01) on comparison
    ``c`` against base; ``where`` follows "Classification expert (B) "."""
    met = c["diff"] >= 0.05 and c["p"] < STRONG
    return (f"Classification expert (B) {where}: {c['diff']:+.3f} against base, "
            f"p = {c['p']:.2g}: target (≥ +0.05 with p < 0.01) " + ("met." if met else "NOT met."),
            met)


def ho_acc(ho: dict, key: str) -> dict:
    """family -> accuracy of strategy ``key`` on it."""
    return {h: r[key]["accuracy"] for h, r in ho.items()}


def cem_target_lines(ho: dict, by: dict, suffix: str, what: str, after: str, name: str,
                     dispatch: tuple[dict, dict], key: str,
                     own: tuple[str, str] | None = None) -> list[str]:
    """CEM's targets on the families ``ho`` (runs ``ho[h][key]``, compared in ``by`` as
    '<name> seed s' where = family + ``suffix``): no seed significantly below base, every seed
    above base on ≥ 2 families of each kind, and, per seed, the order prompt ≤ classifier ≤
    CEM against ``dispatch`` (family -> accuracy of A, of B); ``what`` / ``after`` name the
    CEM. ``own``: (comparison name, words) of the system CEM builds on (the restated base
    model), against which the same count says what CEM adds to it (no target)."""
    def above(ref: str) -> dict:
        return {h: [by[(h + suffix, f"{name} seed {run['seed']}", ref)]
                    for run in r.get(key, [])] for h, r in ho.items()}
    runs = above("base")
    cem = [c for cs in runs.values() for c in cs]
    below = [c for c in cem if c["verdict"].startswith("lower")]
    out = [f"{what} seeds significantly below base on an unseen family{suffix}: "
           f"{len(below)} of {len(cem)}" + ("" if not below else " (" + ", ".join(
               f"{c['where']} {c['a'][len(name) + 1:]}" for c in below) + ")")
           + "; target (none) " + ("met." if not below else "NOT met.")]
    def wins(found: dict, fams: list[str]) -> list[str]:
        return [h for h in fams
                if found[h] and all(c["verdict"].startswith("higher") for c in found[h])]
    mine = above(own[0]) if own else None
    for kind in ("transfer", "two-step"):
        fams = [h for h, r in ho.items() if r.get("kind") == kind and r.get(key)]
        if not fams:
            continue
        won = wins(runs, fams)
        out.append(f"{what} significantly above base on every seed on {len(won)} of "
                   f"{len(fams)} {kind} families{suffix} ({', '.join(won) or 'none'}); target "
                   f"(≥ 2) " + ("met." if len(won) >= 2 else "NOT met."))
        if mine is not None:
            won = wins(mine, fams)
            out.append(f"{what} significantly above {own[1]} on every seed on {len(won)} of "
                       f"{len(fams)} {kind} families{suffix} ({', '.join(won) or 'none'}): what "
                       f"CEM adds to the restatement (no target).")
    for h, r in ho.items():
        if not r.get(key):
            continue
        p_acc, c_acc = dispatch[0][h], dispatch[1][h]
        holding = [run["seed"] for run in r[key] if p_acc <= c_acc <= run["accuracy"]]
        out.append(f"Order prompt ≤ classifier ≤ CEM{after} on {h}{suffix}: {p_acc:.3f}, "
                   f"{c_acc:.3f}, CEM seeds "
                   + ", ".join(f"{run['accuracy']:.3f}" for run in r[key])
                   + f" — holds in the point estimates for {len(holding)} of {len(r[key])} "
                   f"seeds" + (f" ({', '.join(map(str, holding))})" if holding else "")
                   + "; section 4 has the paired tests.")
    return out


def experts_table(results: dict) -> list[str]:
    L = ["| expert | objective | steps run | best step | validation acc | lr | λ (KL) | "
         "baseline | T | batch × samples |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["experts"].items():
        va, steps = e.get("validation_accuracy"), e.get("steps_run")
        rl = e.get("objective") == "rl"          # the other columns only apply to RL
        rl_cols = (f"{e.get('kl_coef')} | {e.get('baseline')} | {e.get('temperature')} | "
                   f"{e.get('batch_size')} × {e.get('samples_per_prompt')}" if rl else
                   f"— | — | — | {e.get('batch_size')} references")
        L.append(f"| {name} | {e.get('objective')} | {'—' if steps is None else steps} | "
                 f"{e.get('best_step')} | {'—' if va is None else f'{va:.3f}'} | {e.get('lr')} "
                 f"| {rl_cols} |")
    return L


#: The property of the tiny world every number below depends on (stated with every table).
WORLD = ("**The world these numbers come from.** The bundled base model was pre-trained on a "
         "corpus in which a share of each task's answers follows a *competing habit* (e.g. the "
         "smallest option for \"Which is largest?\", a word sorted descending for `sort`, the "
         "next label in a cycle for `classify`); every answer scored here, and every reward of "
         "RL training, follows the task's own rule. The base model has the ability but does "
         "not always prefer it, the situation SVF is meant for: gains here measure a shifted "
         "preference, not a skill taught. The habits and how often the base model's greedy "
         "answers follow them: `t2fast/assets/tiny_llama/README.md`.")


def cross_model_intro(results: dict) -> str:
    cm = results["cross_model"]
    return (f"The experts of section 1 applied to a second base model: `{cm['model']}`, the "
            f"bundled model's shapes and pre-training mixture from another random start (seed "
            f"{cm['seed']}; weights sha256 `{cm['sha256'][:12]}…`; its README has the run). "
            "Singular vectors of two independently trained models are unrelated, so an entry "
            "z[i] can only keep its position in the σ order: *in σ order* puts z[i] on the "
            "second model's i-th largest σ, *reversed* on its i-th smallest, *shuffled z* (the "
            "control) permutes each matrix's z at random (`scripts/cross_model.py`). Each expert "
            "is measured on its own family; the second model's own experts (same recipe) show "
            "how much an expert can gain there.")


#: The sections a results.json may lack: (its key, heading, introduction, table).
EXTRA_SECTIONS = (
    ("truncated", "3b. Truncated experts (test split)", lambda results: (
        "Each training family's expert with, per matrix, only the k directions of σ ⊙ (z − 1) "
        "largest in absolute value kept (the others at z = 1; `scripts/expert_truncation.py`), "
        "r = the matrix's rank (64 or 256 here). The last row: what a dense W plus a rank-k "
        "correction would read, over W's bytes."), truncation_table),
    ("surface", "3c. Surface variants: near transfer (test split)", lambda results: (
        "Each training family's test questions with a small change of surface (spacing, "
        "quotes, case, punctuation; `scripts/surface_variants.py`), on which the base model was "
        "never pre-trained and no expert trained: every variant listed there is measured. *As "
        "trained* is the family itself (section 1's numbers). Habit's answer: the share of "
        "questions answered with the pre-training habit's answer "
        "(`t2fast/assets/tiny_llama/README.md`), by the base model and by the family's expert. "
        "Routed: the share of questions pass 1 sends to the family's own expert."),
     surface_table),
    ("cross_model", "3d. Cross-model transfer (test split)", cross_model_intro,
     cross_model_tables),
    ("transfer_base", "3e. Transfer families on a base pre-trained on them (test split)",
     transfer_base_intro, transfer_base_tables),
    ("restated", "3f. Restated before dispatch: the transfer base's own chain of thought (test "
                 "split)", restated_intro, restated_table),
)


def later_sections(results: dict) -> str:
    """'; measured later with --only: ...' for the sections re-measured after the full run."""
    later = results.get("remeasured", [])
    if not later:
        return ""
    secs, where = results.get("section_s", {}), results.get("section_machine", {})

    def on(k: str) -> str:
        m = where.get(k, results["machine"])
        return "" if m == results["machine"] else f" on {m}"
    return ("; measured afterwards with `--only`: "
            + ", ".join(f"{k} ({secs[k]:.0f} s{on(k)})" for k in later))


def render(results: dict) -> str:
    """The README text for ``results`` (the parsed results.json)."""
    a = results["args"]
    rows = comparisons(results)
    L = ["# Measured results in the tiny world", "",
         f"Generated by `python scripts/make_results.py{a.get('command_flags', '')}` from the "
         f"shipped experts (`experts/`): n = {a['n']} test examples per task, greedy decoding, "
         f"CEM seeds {a['cem_seeds']} ({a['shots']} shots, population {a['cem_population']}, "
         f"{a['cem_iterations']} iterations). Brackets are Wilson 95% intervals. Do not edit by "
         f"hand: `python scripts/make_results.py --render-only` rewrites this file from "
         f"`results.json`.", "",
         f"Machine: {results['machine']}; measuring took {results['wall_s']:.0f} s"
         + later_sections(results) + ".", "",
         WORLD, "",
         "## 1. Training families (test split)", ""]
    L += train_table(results)
    L += ["", "## 2. Unseen families (test split): held out and transfer", ""]
    L += heldout_tables(results)
    L += ["", "## 3. Classification (pass 1) on the classify test split", ""]
    L += classification_tables(results)
    for key, heading, intro, table in EXTRA_SECTIONS:
        if results.get(key):
            L += [f"## {heading}", "", intro(results), ""] + table(results) + [""]
    L += ["## 4. Every paired comparison", "",
          "Each line compares two systems on the same test questions: *A only* / *B only* count "
          "the questions only A / only B answers correctly; p is the exact two-sided McNemar "
          f"test. Verdicts at p < {ALPHA} (p < {STRONG} marked), not adjusted for the "
          f"{len(rows)} comparisons: expect about {ALPHA * len(rows):.1f} false positives at "
          "5% if nothing differed.", ""]
    L += comparison_table(rows)
    L += ["", "## 5. The quality targets", ""]
    L += [f"- {t}" for t in target_lines(results, rows)]
    if results.get("surface"):
        L += [f"- {t}" for t in surface_gains(results, rows)]
    if results.get("cross_model"):
        L += [f"- {t}" for t in cross_model_lines(results, rows)]
    notes = identity_notes(results)
    if notes:
        L += ["", "## 6. Notes", ""] + [f"- {t}" for t in notes]
    L += ["", "## Experts (from their metadata)", ""]
    L += experts_table(results)
    L += ["", "Recipes, commands and the λ / lr sweep: `experts/README.md`; training logs: "
          "`experts/*.log.jsonl`, `experts/baselines/*.log.jsonl`, `experts/sweep/`.", ""]
    return "\n".join(L)
