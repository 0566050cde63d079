"""The tiny world's results: the committed README is exactly what the renderer makes of the
committed JSON, every comparison is paired, the exact McNemar test, and the training recipes."""
import itertools
import json
import math
import pathlib

import pytest

from t2fast.train.evaluate import mcnemar_exact

from script_loader import load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results():
    return json.loads((ROOT / "results" / "results.json").read_text())


def test_committed_readme_is_rendered_from_committed_json(results):
    render = load_script("results_render").render
    assert (ROOT / "results" / "README.md").read_text() == render(results)


def records(results):
    """Every measured record with a per-question correctness mask, by where it was measured."""
    for f, row in results["train_families"].items():
        for k, rec in row.items():
            yield f, k, rec
    for h, r in results["heldout"].items():
        for k, rec in r.items():
            for run in (rec if isinstance(rec, list) else [rec]):
                if isinstance(run, dict):
                    yield h, k, run
    for k, rec in results["classification"].items():
        yield "classify", k, rec
    for f, row in results["truncated"]["families"].items():
        for d, rec in row.items():
            yield f, f"truncated r/{d}", rec
    for f, variants in results.get("surface", {}).items():
        for v, r in variants.items():
            for k in ("base", "parent_expert", "prompt", "classifier"):
                yield f"{f}: {v}", k, r[k]
    for f, row in results.get("cross_model", {}).get("families", {}).items():
        for k, rec in row.items():
            for run in (rec if isinstance(rec, list) else [rec]):
                yield f"{f} (second model)", k, run


def masked(node, path=()):
    """Every record with a per-question mask anywhere in ``node``: (path, record)."""
    if isinstance(node, dict):
        if "correct_mask" in node:
            yield path, node
        for k, v in node.items():
            yield from masked(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from masked(v, (*path, i))


def check_paired(rec, n, where):
    m = rec["correct_mask"]
    assert set(m) <= {"0", "1"} and len(m) == rec["n"] == n, where
    assert m.count("1") == rec["correct"], where
    assert math.isclose(rec["accuracy"], rec["correct"] / n), where


def test_every_masked_record_is_paired(results):
    """Every record of every section, wherever it sits, holds one mask bit per question."""
    n = results["args"]["n"]
    found = list(masked(results))
    for path, rec in found:
        check_paired(rec, n, path)
    sections = {path[0] for path, _ in found}
    assert {"train_families", "heldout", "transfer_base", "restated"} <= sections, sections


def test_results_are_paired_per_question(results):
    n = results["args"]["n"]
    seen = set()
    for where, key, rec in records(results):
        check_paired(rec, n, (where, key))
        seen.add(where)
    second = {f"{f} (second model)" for f in results.get("cross_model", {}).get("families", {})}
    variants = {f"{f}: {v}" for f, vs in results.get("surface", {}).items() for v in vs}
    assert seen == (set(results["train_families"]) | set(results["heldout"]) | {"classify"}
                    | second | variants)
    for h, r in results["heldout"].items():      # one CEM row per seed, never pooled
        for key in ("cem", *results["args"]["cem_variants"]):
            assert [run["seed"] for run in r[key]] == results["args"]["cem_seeds"], (h, key)


def test_every_cem_row_truncation_and_routing_is_compared(results):
    """Each CEM seed (every variant) is tested against base, each truncated expert against the
    full expert and base, and the routing of pass 1 is reported per unseen family."""
    rr = load_script("results_render")
    rows = rr.comparisons(results)
    pairs = {(c["where"], c["a"], c["b"]) for c in rows}
    for h, r in results["heldout"].items():
        for key in ("cem", *results["args"]["cem_variants"]):
            for run in r[key]:
                assert (h, f"{rr.CEM_LABELS[key]} seed {run['seed']}", "base") in pairs
    tr = results["truncated"]
    assert tr["divisors"] == [2, 4, 8, 16]
    for f in tr["families"]:
        for d in tr["divisors"]:
            assert (f, f"truncated k = r/{d}", "base") in pairs
    text = rr.render(results)
    for h, r in results["heldout"].items():
        for s in ("prompt", "classifier"):
            assert f"| {h} | {s} | {rr.routed(r[s], r['parent']):.3f} |" in text


def brute_force_p(a_only, b_only):
    """Two-sided exact p by enumerating every sign pattern of the discordant questions."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    far = abs(a_only - n / 2)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=n)
               if abs(sum(signs) - n / 2) >= far - 1e-12)
    return hits / 2 ** n


@pytest.mark.parametrize("a_only,b_only,same", [(5, 0, 3), (0, 5, 0), (3, 1, 7), (7, 2, 1),
                                                (4, 4, 2), (0, 0, 9), (6, 1, 0)])
def test_mcnemar_exact_matches_enumeration(a_only, b_only, same):
    a = [True] * a_only + [False] * b_only + [True] * same + [False] * 2
    b = [False] * a_only + [True] * b_only + [True] * same + [False] * 2
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (a_only, b_only)
    assert math.isclose(r["p"], brute_force_p(a_only, b_only))
    assert math.isclose(mcnemar_exact(b, a)["p"], r["p"])
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact(a, b[:-1])


def test_compare_verdicts():
    compare = load_script("results_render").compare

    def rec(bits):
        return {"correct_mask": bits, "accuracy": bits.count("1") / len(bits)}
    better = compare("x", "A", rec("1" * 12 + "0" * 8), "B", rec("0" * 20))
    assert better["verdict"] == "higher (p < 0.01)" and better["a_only"] == 12
    worse = compare("x", "A", rec("0" * 20), "B", rec("1" * 6 + "0" * 14))
    assert worse["verdict"] == "lower (p < 0.05)"     # p = 2/64
    same = compare("x", "A", rec("10" * 10), "B", rec("01" * 10))
    assert same["verdict"] == "no significant difference" and same["p"] == 1.0


def test_recipes_are_valid_train_configurations(tmp_path):
    from t2fast import cli
    from t2fast.train import TrainConfig
    recipes = load_script("make_results").RECIPES
    parser = cli.build_parser()
    assert {pathlib.Path(o).parent.name for o in recipes} == {"experts", "baselines"}
    assert sum(o.startswith("results/second_base/") for o in recipes) == 3
    for out, argv in recipes.items():
        args = parser.parse_args(["train", "--out", str(tmp_path / pathlib.Path(out).name),
                                  *argv])
        cfg = TrainConfig(**{k: getattr(args, k) for k in (
            "task", "out", "method", "objective", "steps", "lr", "kl_coef", "baseline",
            "temperature", "batch_size", "samples_per_prompt", "seed")}).validate()
        assert cfg.seed == 0 and (cfg.objective == "sft" or cfg.kl_coef > 0), out


def test_experts_readme_commands_are_the_recipes():
    """The shell variables in experts/README.md spell exactly the recipes `--train` runs."""
    import re
    mr = load_script("make_results")
    text = (ROOT / "experts" / "README.md").read_text()
    shell = {m.group(1): m.group(2).replace("\\\n", " ").split()
             for m in re.finditer(r'^(RL|SFT|LORA)="(.*?)"', text, re.S | re.M)}
    assert shell == {"RL": mr.RL, "SFT": mr.SFT, "LORA": mr.LORA}
    # LoRA's RL runs: the README substitutes RL's lr; the table trains with that lr
    m = re.search(r"\$\{RL/--lr (\S+)/--lr (\S+)\}", text)
    assert m and mr.RL[mr.RL.index("--lr") + 1] == m.group(1)
    assert mr.LORA_RL[mr.LORA_RL.index("--lr") + 1] == m.group(2)
    assert [a for a in mr.LORA_RL if a not in (m.group(1), m.group(2))] == [
        a for a in mr.RL + mr.LORA if a not in (m.group(1), m.group(2))]


def test_experts_readme_tables_are_rendered_from_the_shipped_logs():
    """Every training-run table of experts/README.md is what scripts/log_tables.py renders
    from the JSONL logs next to the experts."""
    lt = load_script("log_tables")
    text = (ROOT / "experts" / "README.md").read_text()
    for name in lt.TABLES:
        m = lt.marked(name).search(text)
        assert m, f"experts/README.md has no {name!r} table block"
        assert m.group(2) == lt.render(name), f"table {name!r}: run scripts/log_tables.py --write"


def test_log_summary_of_a_small_log(tmp_path):
    """Steps run, sampled accuracy (first vs last 25 steps), validation (0 → best (step) → last)
    and the mean KL of the last 10 steps, from a hand-written log."""
    lt = load_script("log_tables")
    recs = [{"event": "config", "config": {"objective": "rl", "kl_coef": 0.05}}]
    recs += [{"event": "step", "step": i, "accuracy": 0.0 if i <= 25 else 1.0, "kl": i / 100}
             for i in range(1, 61)]
    recs += [{"event": "eval", "step": s, "accuracy": a}
             for s, a in [(0, 0.25), (25, 0.5), (50, 0.75), (60, 0.5)]]
    recs += [{"event": "done", "steps_run": 60, "stopped_early": True}]
    log = tmp_path / "run.log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert lt.summarise(log) == ("60 (early stop)", "0.000 → 1.000", "0.250 → 0.750 (50) → 0.500",
                                 f"{sum(range(51, 61)) / 1000:.3f}")


def test_unseen_targets_on_a_synthetic_transfer_family():
    """Routing shares, the classifier's gain, CEM seeds below base and the order of the three
    strategies, read off hand-made records of one transfer family."""
    rr = load_script("results_render")

    def rec(ones, n=100, **extra):
        return {"n": n, "correct": ones, "accuracy": ones / n,
                "correct_mask": "1" * ones + "0" * (n - ones), **extra}
    fam = {"parent": "arith", "kind": "transfer", "base": rec(20), "parent_expert": rec(30),
           "uniform": rec(20), "prompt": rec(25, picked={"arith": 85, "other": 15}),
           "classifier": rec(40, picked={"arith": 79, "strings": 21}),
           "cem": [{**rec(45), "seed": 0}, {**rec(5), "seed": 1}]}
    results = {"heldout": {"arith_words": fam}, "column_labels": {}, "train_families": {},
               "classification": {"classifier": rec(1), "prompt": rec(1)}}
    text = "\n".join(rr.unseen_target_lines(results["heldout"], rr.comparisons(results)))
    assert "prompt dispatch (A) routes arith_words to arith: 0.850; target (≥ 0.80) met." in text
    assert "classification expert (B) routes arith_words to arith: 0.790; target (≥ 0.80) NOT met." \
        in text
    assert "Classification expert (B) on the transfer family arith_words: +0.200" in text
    assert "1 of 2 (arith_words seed 1); target (none) NOT met." in text
    assert "on 0 of 1 transfer families (none)" in text
    assert ("0.250, 0.400, CEM seeds 0.450, 0.050 — holds in the point estimates for 1 of 2 "
            "seeds (0);") in text                                  # per seed, never pooled
    # differences from the counts: 45 against 40 of 100 is +0.05 exactly (0.45 - 0.40 is not)
    assert 0.45 - 0.40 < 0.05 and rr.compare("w", "a", rec(45), "b", rec(40))["diff"] == 0.05
    # the transfer base's families, a two-step one among them, counted apart from section 2's
    tb = {"arith_words": fam, "arith_steps": {**fam, "kind": "two-step"}}
    rows = rr.comparisons({**results, "transfer_base": {"train_families": {
        "arith": {"base": rec(20), "expert": rec(50)}}, "unseen": tb}})
    assert [c["diff"] for c in rows if c["where"] == "arith (transfer base)"] == [0.3]
    text = "\n".join(rr.unseen_target_lines(tb, rows, rr.TB))
    assert "routes arith_steps (transfer base) to arith: 0.850; target (≥ 0.80) met." in text
    assert ("Classification expert (B) on the two-step family arith_steps (transfer base): "
            "+0.200") in text
    assert "below base on an unseen family (transfer base): 2 of 4 (" in text
    assert "on 0 of 1 two-step families (transfer base) (none)" in text


def test_restated_targets_on_synthetic_records():
    """Section 3f: every restated strategy against base, B after restatement against the
    restated base model and against B as asked; its targets read off hand-made records."""
    rr = load_script("results_render")

    def rec(ones, n=100, **extra):
        return {"n": n, "correct": ones, "accuracy": ones / n,
                "correct_mask": "1" * ones + "0" * (n - ones), **extra}
    fam = {"parent": "arith", "kind": "transfer", "base": rec(20),
           "restated_base": rec(30), "restated_parent_expert": rec(50),
           "restated_prompt": rec(45, picked={"arith": 75, "other": 25}),
           "restated_classifier": rec(50, picked={"arith": 100}),
           "restated_cem": [{**rec(60), "seed": 0}, {**rec(45), "seed": 1}]}
    weak = {**fam, "kind": "two-step", "restated_classifier": rec(24, picked={"arith": 100}),
            "restated_cem": [{**rec(5), "seed": 0}, {**rec(20), "seed": 1}]}
    asked = {"parent": "arith", "kind": "transfer", "base": rec(20), "parent_expert": rec(20),
             "uniform": rec(20), "prompt": rec(20), "classifier": rec(10)}
    tb = {"train_families": {}, "unseen": {"arith_words": asked}}
    results = {"heldout": {}, "column_labels": {}, "train_families": {}, "transfer_base": tb,
               "classification": {"classifier": rec(1), "prompt": rec(1)},
               "restated": {"families": {"arith_words": fam, "arith_steps": weak}}}
    rows = rr.comparisons(results)
    got = {(c["where"], c["a"], c["b"]): round(c["diff"], 3) for c in rows}
    b = "restated, classification expert (B)"
    assert got[("arith_words (transfer base)", b, "base")] == 0.3
    assert got[("arith_words (transfer base)", b, "restated, base model")] == 0.2
    assert got[("arith_words (transfer base)", b, "classification expert (B)")] == 0.4
    assert ("arith_steps (transfer base)", b, "classification expert (B)") not in got
    text = "\n".join(rr.restated_target_lines(results["restated"]["families"], rows))
    assert ("prompt dispatch (A) routes the restated arith_words (transfer base) to arith: 0.750; "
            "target (≥ 0.80) NOT met.") in text
    assert "after restatement on the transfer family arith_words (transfer base): +0.300" in text
    assert ("after restatement on the two-step family arith_steps (transfer base): +0.040 "
            "against base, p = ") in text
    assert "on 1 of 2 transfer and two-step families (transfer base); target (≥ 3) NOT met." \
        in text
    assert got[("arith_words (transfer base)", "restated, CEM seed 0", b)] == 0.1
    assert ("CEM after restatement seeds significantly below base on an unseen family (transfer "
            "base): 1 of 4 (arith_steps (transfer base) seed 0); target (none) NOT met.") in text
    assert "on every seed on 1 of 1 transfer families (transfer base) (arith_words)" in text
    assert "on every seed on 0 of 1 two-step families (transfer base) (none)" in text
    assert ("restatement on arith_words (transfer base): 0.450, 0.500, CEM seeds 0.600, 0.450 — "
            "holds in the point estimates for 1 of 2 seeds (0);") in text
    # what CEM adds to the restatement: each seed against the restated base model
    assert got[("arith_words (transfer base)", "restated, CEM seed 1", "restated, base model")] \
        == 0.15
    assert ("CEM after restatement significantly above the base model on the restated questions "
            "on every seed on 1 of 1 transfer families (transfer base) (arith_words)") in text
    assert ("above the base model on the restated questions on every seed on 0 of 1 two-step "
            "families (transfer base) (none)") in text


def test_restated_section_restates_as_section_3e_and_asks_as_it(results):
    """A two-step question's restatement is the first step the base model wrote in section
    3e (its share of right ones is 3e's), and the base model on the questions as asked is
    section 3e's."""
    for h, r in results["restated"]["families"].items():
        asked = results["transfer_base"]["unseen"][h]["base"]
        if r["kind"] == "two-step":
            assert r["restated_right"] == asked["restated"]
        assert r["base"]["correct_mask"] == asked["correct_mask"]


def test_surface_variants_are_all_measured_and_reproduce_section_1(results):
    """Every variant of the script is in the JSON (no selection), each compared with base three
    times, and the unchanged surface gives exactly section 1's answers."""
    sv = load_script("surface_variants")
    rows = load_script("results_render").comparisons(results)
    pairs = {(c["where"], c["a"], c["b"]) for c in rows}
    surface = results["surface"]
    assert {f: list(v) for f, v in surface.items()} == {f: list(v) for f, v in sv.VARIANTS.items()}
    for f, variants in surface.items():
        for v in variants:
            for name in ("parent expert", "prompt dispatch (A)", "classification expert (B)"):
                assert (f"{f}: {v}", name, "base") in pairs
        for r in variants.values():        # a habit answer is a wrong answer
            for k in ("base", "parent_expert"):
                assert 0 <= r[k]["habit"] <= 1 - r[k]["accuracy"] + 1e-9
        same, first = variants["as trained"], results["train_families"][f]
        assert same["base"]["correct_mask"] == first["base"]["correct_mask"]
        assert same["parent_expert"]["correct_mask"] == first["svf_rl"]["correct_mask"]



def test_sections_measured_later_are_named_with_their_machine(results):
    later = load_script("results_render").later_sections
    assert later({**results, "remeasured": []}) == ""
    r = {**results, "remeasured": ["surface"], "section_s": {"surface": 12.4},
         "section_machine": {"surface": "arm64 CPU, 2 torch thread(s), torch 2.15.0"}}
    assert later(r) == ("; measured afterwards with `--only`: surface (12 s on arm64 CPU, "
                        "2 torch thread(s), torch 2.15.0)")
    r["section_machine"] = {"surface": results["machine"]}
    assert later(r) == "; measured afterwards with `--only`: surface (12 s)"
