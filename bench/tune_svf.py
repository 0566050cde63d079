"""Write the SVF kernels' config table for this GPU (``t2fast/kernels/configs/<arch>.json``).

    python bench/tune_svf.py                          # the layer groups of Llama-3-8B, Qwen2.5-7B
    python bench/tune_svf.py --quick                  # fewer candidates (a few minutes)
    python bench/tune_svf.py --order-dependent        # the opt-in plans (split-K, vs composition)
    python bench/tune_svf.py --untuned --arch sm90    # the heuristic's plans, no GPU needed
    python bench/tune_svf.py --update --model llama3-8b --buckets 16 64 4096   # some entries

Every op a layer runs (the q/k/v group, o, the gate/up group, down; ``--shapes MxN`` for single
matrices) is tuned at every token bucket, keyed by its total output Σ m_i and input n. The tuner
cannot regress a table:

* the entry already in the table (when it is of the family being tuned) and the heuristic plan
  are always candidates, next to a grid of tiles (``block_n`` 16-128 — 128 also with
  ``--quick`` — stages, warps; deterministic plans keep their ``block_k``, no split and one dot
  family, see ``t2fast.kernels.plans``);
* every candidate is compiled for sm_90 first and rejected if ``ptxas`` reports spills, more
  than 255 registers, no tensor-core instruction or too much shared memory (the gates of
  ``tests/test_kernel_compile.py``, under the Triton version installed here);
* the shrink is timed first; the expand is then timed reading ``h`` in the dtype the chosen
  shrink writes (x's dtype, fp32 only after a split shrink), as the real path does;
* the best pair, the current entry and the heuristic plan are timed as whole ops in alternating
  rounds (``timing.time_alternating``: each candidate once per round, the starting one rotating),
  weights L2-cold under CUDA graphs (enough copies that the lightest call, an expand reading
  only U, exceeds L2 several times); the faster of the current entry and the heuristic plan
  (the current entry on a tie) stays unless the best pair beats it by ``TUNED_MARGIN`` (2 %);
  for order-dependent entries the torch composition joins that race and wins ties
  (``backend`` "torch" unless the kernels are strictly faster).

Tuning runs offline, never on a user's hot path; ``t2fast/kernels/configs/README.md`` says how
tables are found.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "TRITON_INTERPRET" not in os.environ:
    import torch as _t
    os.environ["TRITON_INTERPRET"] = "0" if _t.cuda.is_available() else "1"

import torch  # noqa: E402
import triton  # noqa: E402

import baselines as B  # noqa: E402
from shapes import group_dims, groups  # noqa: E402
from t2fast.kernels import aot, plans, shrink_expand  # noqa: E402
from t2fast.kernels.plans import SVFPlan, TableEntry, TileConfig  # noqa: E402
from timing import CUDA, time_alternating, write_text  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Shared memory budget for a candidate's pipeline (bytes; sm_90 allows 227 KB per CTA).
SMEM_BUDGET = 200 * 1024
REPS = 15
#: How much faster (relative) a tuned plan must measure than the incumbents to replace them.
TUNED_MARGIN = 0.02


def candidates(base: TileConfig, M: int, N: int, K: int, a_bytes: int, num_sms: int,
               quick: bool, deterministic: bool) -> list[TileConfig]:
    """Tiles around ``base``, GPU-filled: block_n × stages × warps (× block_k when the reduction
    order may change). ``base`` itself comes first."""
    bns = (32, 64, 128) if quick else (16, 32, 64, 128)
    bks = (base.block_k,) if deterministic else ((64, 128) if quick else (64, 128, 256))
    stages = (3, 4)
    warps = (base.num_warps,) if base.block_m < 64 or quick else (4, 8)
    out = [base]
    for bn, bk, st, w in itertools.product(bns, bks, stages, warps):
        smem = st * (base.block_m * bk * a_bytes + bk * bn * 2)
        if smem > SMEM_BUDGET:
            continue
        c = replace(base, block_n=bn, block_k=bk, num_stages=st, num_warps=w, split_k=1)
        c = plans.fill_gpu(c, M, N, K, num_sms, split=not deterministic)
        if c not in out:
            out.append(c)
    return out


def sm90_clean(specs: list[dict]) -> list[bool]:
    """For each compile spec (``aot.compile_reports``), whether the sm_90 binary passes the
    gates: no spills, ≤ 255 registers, tensor cores, shared memory within one SM."""
    reports = aot.compile_reports(specs)
    return [r["spill_bytes"] == 0 and r["registers"] is not None and r["registers"] <= 255
            and r["tensor_cores"] and 0 < r["shared"] <= aot.SM90_MAX_SHARED for r in reports]


def _specs(op: str, tile: TileConfig, h_dtype: str) -> list[dict]:
    """The binaries a tile must compile to: the shrink with a z table and with α mixing (the
    vLLM layers' variant), or the expand with its real h dtype."""
    t = asdict(tile)
    if op == "shrink":
        return [dict(op="shrink", tile=t, dtype="bf16", mix=mix) for mix in (False, True)]
    return [dict(op="expand", tile=t, dtype="bf16", h_dtype=h_dtype)]


def keep_clean(op: str, tiles: list[TileConfig], h_dtype: str, check=sm90_clean
               ) -> list[TileConfig]:
    """``tiles`` whose binaries all pass :func:`sm90_clean` (one batch of compiles)."""
    specs = [_specs(op, t, h_dtype) for t in tiles]
    ok = check([s for group in specs for s in group])
    out, at = [], 0
    for t, group in zip(tiles, specs):
        if all(ok[at:at + len(group)]):
            out.append(t)
        at += len(group)
    return out


def tune_entry(slices, T: int, dtype, num_sms: int, quick: bool, deterministic: bool,
               current: SVFPlan | None, timer=time_alternating, check=sm90_clean, log=print
               ) -> TableEntry:
    """Tune one op (``slices`` [(m_i, n)]) at bucket ``T``; see the module docstring.

    ``timer`` takes ``{candidate: [callable per copy]}`` (candidates are shrink tiles, expand
    tiles, then the names "tuned", "heuristic", "current", "torch") and returns µs per
    candidate; ``check`` takes compile specs and returns one bool each."""
    m, n, R = group_dims(slices)
    copies = B.l2_cold_groups(slices, T, dtype, DEVICE, reads=("U", "Vh"))
    heuristic = plans.heuristic_plan(T, m, n, R, dtype, num_sms, deterministic)
    x_name = "bf16" if dtype == torch.bfloat16 else "fp16"

    def shrink_calls(tile):
        h_dtype = torch.float32 if tile.split_k > 1 else dtype
        return [lambda p=p: shrink_expand.launch_shrink(p.x, p.Vh, p.S, p.idx, Z=p.Z, tile=tile,
                                                        h_dtype=h_dtype) for p in copies]

    shrinks = keep_clean("shrink", candidates(heuristic.shrink, T, R, n, 2, num_sms, quick,
                                              deterministic), x_name, check)
    shrink_us = timer({t: shrink_calls(t) for t in shrinks}, REPS)
    shrink = min(shrinks, key=shrink_us.get)
    h_dtype = SVFPlan(shrink, heuristic.expand).h_dtype(dtype)
    hs = [torch.randn(T, R, device=DEVICE).to(h_dtype) for _ in copies]

    def expand_calls(tile):
        return [lambda p=p, h=h: shrink_expand.launch_expand(h, p.Us, tile=tile, out_dtype=dtype)
                for p, h in zip(copies, hs)]

    h_name = "fp32" if h_dtype == torch.float32 else x_name
    expands = keep_clean("expand", candidates(heuristic.expand, T, m, R, h_dtype.itemsize,
                                              num_sms, quick, True), h_name, check)
    expand_us = timer({t: expand_calls(t) for t in expands}, REPS)
    expand = min(expands, key=expand_us.get)

    finalists = {}
    if current is not None and keep_clean("shrink", [current.shrink], x_name, check) and \
            keep_clean("expand", [current.expand], "fp32" if current.shrink.split_k > 1
                       else x_name, check):
        finalists["current"] = current
    finalists["heuristic"] = heuristic
    finalists["tuned"] = SVFPlan(shrink, expand)
    calls = {name: [lambda p=p, pl=pl: shrink_expand.launch_group(p.x, p.Us, p.S, p.Vh, p.idx,
                                                                  Z=p.Z, plan=pl)
                    for p in copies]
             for name, pl in finalists.items()}
    if not deterministic:
        calls["torch"] = [lambda p=p: B.group_composition(p) for p in copies]
    us = timer(calls, REPS)
    # the incumbents first (a tie keeps the shipped entry, then the heuristic); the tuned plan
    # must beat them by the noise margin
    best = min(["current", "heuristic"] if "current" in finalists else ["heuristic"],
               key=us.get)
    if us["tuned"] < us[best] * (1 - TUNED_MARGIN):
        best = "tuned"
    backend = "triton"
    if not deterministic and us["torch"] <= us[best]:
        backend = "torch"                       # ties go to the composition
    log(f"{m}x{n} (R {R}) T<={T}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items())
        + f" -> {best if backend == 'triton' else 'torch'}")
    plan = replace(finalists[best], backend=backend, source="given")
    return TableEntry(T, m, n, plan, tuned=True, deterministic=deterministic)


def ops_of(models: list[str]) -> list[list[tuple[int, int]]]:
    """The distinct ops (slices) of the models' layers."""
    seen = {}
    for model in models:
        for slices in groups(model).values():
            seen.setdefault(group_dims(slices)[:2], slices)
    return [seen[k] for k in sorted(seen)]


def main(argv=None, timer=time_alternating, check=sm90_clean) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["llama3-8b", "qwen2.5-7b"])
    ap.add_argument("--shapes", nargs="*", default=None, metavar="MxN",
                    help="single matrices (out x in) instead of the models' layer ops")
    ap.add_argument("--buckets", nargs="*", type=int, default=list(plans.T_BUCKETS))
    ap.add_argument("--quick", action="store_true", help="fewer candidates per op")
    ap.add_argument("--order-dependent", action="store_true",
                    help="tune the opt-in plans (split-K, backend against the composition) "
                         "instead of the deterministic ones")
    ap.add_argument("--untuned", action="store_true",
                    help="write the heuristic's plans without measuring (no GPU needed)")
    ap.add_argument("--arch", default=None, help="table name, e.g. sm90 (default: this GPU's)")
    ap.add_argument("--num-sms", type=int, default=None, help="SM count (default: this GPU's)")
    ap.add_argument("--update", action="store_true",
                    help="change only the chosen entries of the existing table (--out or the "
                         "shipped one); with --untuned, its tuned entries are kept too")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bad = [b for b in args.buckets if b not in plans.T_BUCKETS]
    if bad:
        ap.error(f"--buckets {bad} are not table buckets {plans.T_BUCKETS}")
    if not args.untuned and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("tuning needs a CUDA GPU (or TRITON_INTERPRET=1 for a dry run)")
    arch, sms = (plans.device_arch(torch.device("cuda")) if CUDA else ("cpu", 132))
    arch, sms = args.arch or arch, args.num_sms or sms
    op_slices = ([[tuple(int(v) for v in s.split("x"))] for s in args.shapes] if args.shapes
                 else ops_of(args.model))
    deterministic = not args.order_dependent
    dtype = torch.bfloat16
    out = args.out or plans.CONFIG_DIR / f"{arch}.json"
    kept, found = {}, {}
    if args.update and out.exists():
        found = json.loads(out.read_text())
        kept = {(e.m, e.n, e.t, e.deterministic): e
                for e in plans.parse_table(found, str(out))}
    # provenance of the measured entries: this GPU's when this run tunes, else the table's
    where = ({k: found.get(k) for k in PROVENANCE} if args.untuned
             else this_run(torch.cuda.get_device_name() if CUDA else None))
    for slices, T in itertools.product(op_slices, args.buckets):
        m, n, R = group_dims(slices)
        key = (m, n, T, deterministic)
        if args.untuned:
            if not getattr(kept.get(key), "tuned", False):
                plan = plans.heuristic_plan(T, m, n, R, dtype, sms, deterministic)
                kept[key] = TableEntry(T, m, n, replace(plan, source="given"),
                                       deterministic=deterministic)
        else:
            current = kept.get(key)
            kept[key] = tune_entry(slices, T, dtype, sms, args.quick, deterministic,
                                   current.plan if current else None, timer, check)
            write_table(out, list(kept.values()), arch, sms, where)  # a cut-off run keeps its work
    write_table(out, list(kept.values()), arch, sms, where)
    print(f"wrote {len(kept)} entries to {out}")
    return out


# Top-level fields of a table that say where its measurements come from.
PROVENANCE = ("device", "date", "torch", "triton")


def this_run(device: str | None) -> dict:
    """:data:`PROVENANCE` of this run, on ``device`` (None: no GPU measured)."""
    return dict(device=device, date=dt.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__)


def write_table(out: Path, entries: list[TableEntry], arch: str, sms: int, where: dict) -> None:
    """Write ``entries`` with the provenance ``where`` of their measurements (a table with no
    tuned entry gets this run's, with no device); check that the file reads back."""
    tuned = sum(e.tuned for e in entries)
    meta = dict(tuned=tuned == len(entries), **(where if tuned else this_run(None)),
                num_sms=sms, dtype="bfloat16",
                note=(f"{tuned} of {len(entries)} entries tuned by bench/tune_svf.py (L2-cold "
                      "weights, CUDA graphs); the others are heuristic plans "
                      "(plans.heuristic_plan), not measured" if tuned else
                      "heuristic plans (plans.heuristic_plan), not measured: re-tune on the "
                      "GPU with bench/tune_svf.py"))
    write_text(out, json.dumps(plans.table_to_json(entries, arch, meta), indent=1) + "\n")
    plans.parse_table(json.loads(out.read_text()), str(out))     # what we wrote reads back


if __name__ == "__main__":
    main()
