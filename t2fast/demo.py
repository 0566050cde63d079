"""The t2fast demo (``make demo``): one batch, every row with its own SVF expert.

    python -m t2fast.demo [--rows-per-family 8] [--backend auto|torch|triton] [--random]

1. Loads the bundled tiny Llama (``t2fast.models.load_tiny``) — or, with ``--random`` or when
   the bundled weights are missing, a randomly initialised model of the same shape.
2. Decomposes every attention and MLP projection (SVD cache on disk) and loads the shipped
   experts (``t2fast.models.tiny_experts()``: one per training family); families without a
   shipped expert that fits the model get a random stand-in expert, and the output says so.
3. Serves one batch of test prompts from all training families in which each row uses the
   expert of its family, next to the base model, and prints prompts, experts, answers, the
   accuracy per family (base vs experts) and a timing table (base weights, per-row experts
   through the SVF kernels, one merged expert).
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import t2fast
from t2fast.cli_types import integer
from t2fast.experts import Expert, load_expert
from t2fast.generation import generate
from t2fast.models import load_tiny, random_tiny_llama, tiny_experts, tiny_model_path
from t2fast.models.tiny import build_char_tokenizer
from t2fast.tasks import TRAIN_FAMILIES, get_task


#: The most test rows per family (the smallest training family's test split holds more).
MAX_ROWS_PER_FAMILY = 500


def _load_model(random_model: bool):
    if not random_model and (tiny_model_path() / "model.safetensors").exists():
        model, tok = load_tiny()
        return model, tok, "bundled tiny Llama (t2fast/assets/tiny_llama)"
    model = random_tiny_llama(seed=0).eval()
    return model, build_char_tokenizer(), "random tiny Llama (untrained: answers are noise)"


def _experts_for(handle, families) -> tuple[list[Expert], dict[str, str]]:
    """Shipped experts named after the families, random stand-ins for the rest."""
    found, origin = {}, {}
    try:
        shipped = tiny_experts()
    except FileNotFoundError:                 # none shipped: every family gets a stand-in
        shipped = {}
    for name in families:
        if name in shipped:
            try:
                found[name] = load_expert(shipped[name], handle.decomposition.factors)
                origin[name] = str(shipped[name])
            except t2fast.T2FileError as exc:
                print(f"  skipping {shipped[name].name}: {exc}")
    for i, fam in enumerate(families):
        if fam not in found:
            stand_in = Expert.random(fam, handle.decomposition.factors, scale=0.05, seed=i)
            found[fam] = handle.new_expert(fam, stand_in.z)
            origin[fam] = "random stand-in (train one with `t2fast train`)"
    return [found[f] for f in families], origin


def _generate(model, tok, prompts, max_new_tokens):
    """Greedy answers, wall-clock seconds and tokens generated (end-of-sequence included)."""
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, max_new_tokens=max_new_tokens)
    return out.texts, time.perf_counter() - t0, int(out.completion_mask.sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="t2fast demo: per-row SVF experts in one batch")
    ap.add_argument("--rows-per-family", type=integer(1, MAX_ROWS_PER_FAMILY), default=8)
    ap.add_argument("--max-new-tokens", type=integer(1), default=12)
    ap.add_argument("--backend", default="auto", choices=t2fast.ops.BACKENDS)
    ap.add_argument("--random", action="store_true", help="use a random model, not the bundled one")
    ap.add_argument("--show", type=integer(0), default=2, help="rows printed per family")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    steps = tqdm(total=4, desc="demo", leave=False, disable=None)   # a bar on terminals only
    model, tok, what = _load_model(args.random)
    steps.update()
    t0 = time.perf_counter()
    handle = t2fast.patch_model(model, backend=args.backend)
    t_svd = time.perf_counter() - t0
    families = list(TRAIN_FAMILIES)
    experts, origin = _experts_for(handle, families)
    handle.add_experts(experts)
    steps.update()

    rows = [(fam, ex) for fam in families
            for ex in get_task(fam).examples("test", n=args.rows_per_family)]
    prompts = [ex.prompt for _, ex in rows]
    handle.set_mixture(None)
    base_out, base_s, base_tok = _generate(model, tok, prompts, args.max_new_tokens)
    steps.update()
    path = handle.set_mixture(rows=[fam for fam, _ in rows])
    exp_out, exp_s, exp_tok = _generate(model, tok, prompts, args.max_new_tokens)
    handle.merge(families[0])
    _, merged_s, merged_tok = _generate(model, tok, prompts, args.max_new_tokens)
    steps.update()
    steps.close()

    print(f"\nmodel: {what}; {len(handle.targets)} matrices adapted; "
          f"{handle.decomposition.report()} in {t_svd:.1f} s")
    print("experts:")
    for fam in families:
        print(f"  {fam:<10} {origin[fam]}")
    print(f"\none batch of {len(rows)} rows, path: {path} (each row its own expert)\n")
    print(f"{'family':<9} {'expert':<9} {'prompt':<34} {'answer':<10} {'base':<12} {'expert':<12}")
    per_family = {f: [0, 0, 0] for f in families}        # n, base correct, expert correct
    shown = {f: 0 for f in families}
    for (fam, ex), b, e in zip(rows, base_out, exp_out):
        task = get_task(fam)
        ok_b, ok_e = task.score(b, ex).correct, task.score(e, ex).correct
        stats = per_family[fam]
        stats[0] += 1
        stats[1] += ok_b
        stats[2] += ok_e
        if shown[fam] < args.show:
            shown[fam] += 1
            q = ex.prompt.replace("\n", " ").strip()
            print(f"{fam:<9} {fam:<9} {q[:34]:<34} {ex.answer[:10]:<10} "
                  f"{(b.strip()[:9] + (' ✓' if ok_b else ' ✗')):<12} "
                  f"{(e.strip()[:9] + (' ✓' if ok_e else ' ✗')):<12}")
    print(f"\n{'family':<10} {'n':>4} {'base acc':>9} {'expert acc':>11}")
    for fam, (n, cb, ce) in per_family.items():
        print(f"{fam:<10} {n:>4} {cb / n:>9.2f} {ce / n:>11.2f}")
    timing = {
        "base weights (hybrid dense path)": (base_s, base_tok),
        f"per-row experts ({path}, {t2fast.ops.resolve_backend(args.backend, model.device)})":
            (exp_s, exp_tok),
        "one merged expert for all rows": (merged_s, merged_tok),
    }
    print(f"\n{'timing (CPU wall clock)':<52} {'seconds':>8} {'tokens':>7} {'tok/s':>8}")
    for name, (s, n) in timing.items():
        print(f"{name:<52} {s:>8.2f} {n:>7d} {n / s:>8.1f}")
    print(f"\nhandle stats: {handle.stats}")
    return {"per_family": per_family, "timing": timing}


if __name__ == "__main__":
    main()
