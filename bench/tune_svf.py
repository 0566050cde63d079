"""Write the SVF kernels' config table for this GPU (``t2fast.kernels/configs/<arch>.json``).

    python bench/tune_svf.py                          # tune Llama-3-8B and Qwen2.5-7B shapes
    python bench/tune_svf.py --quick                  # fewer candidates (a few minutes)
    python bench/tune_svf.py --untuned --arch sm90    # the heuristic's plans, no GPU needed
    python bench/tune_svf.py --update --model llama3-8b --buckets 16 64 4096   # some entries

For every distinct projection shape of the chosen models and every token bucket, the shrink and
the expand are timed separately over a small grid of tiles (each candidate's reduction split
sized by ``configs.fill_gpu``), weights L2-cold under CUDA graphs (``timing.time_us``); the best
pair is then timed against the torch composition ``((x @ Vh.T) * (S*Z[idx]).to(x.dtype)) @ U.T``
and the faster one becomes the entry's ``backend`` (what ``backend="auto"`` runs). Tuning runs
offline, never on a user's hot path; ``kernels/configs/README.md`` says how tables are found.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "TRITON_INTERPRET" not in os.environ:
    import torch as _t
    os.environ["TRITON_INTERPRET"] = "0" if _t.cuda.is_available() else "1"

import torch  # noqa: E402
import triton  # noqa: E402

import baselines as B  # noqa: E402
from shapes import projections  # noqa: E402
from t2fast.kernels import configs, scaled_matmul as sm, svf_matmul as svf_op  # noqa: E402
from t2fast.kernels.configs import SVFPlan, TableEntry, TileConfig  # noqa: E402
from timing import CUDA, time_us  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Shared memory budget for a candidate's pipeline (bytes; sm_90 allows 227 KB per CTA).
SMEM_BUDGET = 200 * 1024


def shapes_of(models: list[str]) -> list[tuple[int, int]]:
    return sorted({mn for model in models for mn in projections(model).values()})


def candidates(base: TileConfig, M: int, N: int, K: int, a_bytes: int, num_sms: int,
               quick: bool) -> list[TileConfig]:
    """Tiles around ``base``: block_n × block_k × stages (× warps at prefill), GPU-filled."""
    bns = (32, 64) if quick else (16, 32, 64, 128)
    bks = (64, 128) if quick else (64, 128, 256)
    stages = (3, 4)
    warps = (base.num_warps,) if base.block_m <= 64 else (4, 8)
    out = []
    for bn, bk, st, w in itertools.product(bns, bks, stages, warps):
        smem = st * (base.block_m * bk * a_bytes + bk * bn * 2)
        if smem > SMEM_BUDGET:
            continue
        c = replace(base, block_n=bn, block_k=bk, num_stages=st, num_warps=w, split_k=1)
        c = configs.fill_gpu(c, M, N, K, num_sms)
        if c not in out:
            out.append(c)
    return out or [base]


def tune_shape(m: int, n: int, T: int, dtype, num_sms: int, quick: bool, log) -> TableEntry:
    r = min(m, n)
    base = configs.heuristic_plan(T, m, n, r, dtype, num_sms)
    copies = B.l2_cold_problems(m, n, T, dtype, DEVICE, with_dense=False)

    def shrink_us(tile):          # h in x's dtype, or fp32 where the tile splits
        return time_us([lambda p=p: svf_op.svf_shrink(p.x, p.Vh, p.S, p.idx, Z=p.Z, tile=tile,
                                                       h_dtype=dtype) for p in copies])

    def expand_us(tile):
        hs = [torch.randn(T, r, device=DEVICE) for _ in copies]
        return time_us([lambda p=p, h=h: sm.scaled_matmul(h, p.U.t(), tile=tile,
                                                               out_dtype=dtype)
                        for p, h in zip(copies, hs)])

    best = {}
    for op, base_tile, N, K, a_bytes, fn in (
            ("shrink", base.shrink, r, n, 2, shrink_us),
            ("expand", base.expand, m, r, 4, expand_us)):
        timed = [(fn(c), c) for c in candidates(base_tile, T, N, K, a_bytes, num_sms, quick)]
        best[op] = min(timed, key=lambda tc: tc[0])[1]
    plan = SVFPlan(best["shrink"], best["expand"])
    triton_us = time_us([lambda p=p: svf_op.svf_matmul(p.x, p.U, p.S, p.Vh, p.idx, Z=p.Z,
                                                        plan=plan) for p in copies])
    torch_us = time_us([lambda p=p: B.torch_composition(p) for p in copies])
    backend = "triton" if triton_us <= torch_us else "torch"
    log(f"{m}x{n} T<={T}: triton {triton_us:.1f} us, torch {torch_us:.1f} us -> {backend}")
    return TableEntry(T, m, n, replace(plan, backend=backend), tuned=True)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["llama3-8b", "qwen2.5-7b"])
    ap.add_argument("--shapes", nargs="*", default=None, metavar="MxN",
                    help="matrix shapes (out x in) instead of the models' projections")
    ap.add_argument("--buckets", nargs="*", type=int, default=list(configs.T_BUCKETS))
    ap.add_argument("--quick", action="store_true", help="fewer candidates per op")
    ap.add_argument("--untuned", action="store_true",
                    help="write the heuristic's plans without measuring (no GPU needed)")
    ap.add_argument("--arch", default=None, help="table name, e.g. sm90 (default: this GPU's)")
    ap.add_argument("--num-sms", type=int, default=None, help="SM count (default: this GPU's)")
    ap.add_argument("--update", action="store_true",
                    help="change only the chosen entries of the existing table (--out or the "
                         "shipped one); with --untuned, its tuned entries are kept too")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bad = [b for b in args.buckets if b not in configs.T_BUCKETS]
    if bad:
        ap.error(f"--buckets {bad} are not table buckets {configs.T_BUCKETS}")
    if not args.untuned and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("tuning needs a CUDA GPU (or TRITON_INTERPRET=1 for a dry run)")
    arch, sms = (configs.device_arch(torch.device("cuda")) if CUDA else ("cpu", 132))
    arch, sms = args.arch or arch, args.num_sms or sms
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else shapes_of(args.model))
    dtype = torch.bfloat16
    out = args.out or configs.CONFIG_DIR / f"{arch}.json"
    kept, found = {}, {}
    if args.update and out.exists():
        found = json.loads(out.read_text())
        kept = {(e.m, e.n, e.t): e for e in configs.parse_table(found, str(out))}
    # provenance of the measured entries: this GPU's when this run tunes, else the table's
    where = ({k: found.get(k) for k in PROVENANCE} if args.untuned
             else this_run(torch.cuda.get_device_name() if CUDA else None))
    for (m, n), T in itertools.product(shapes, args.buckets):
        if args.untuned:
            if not getattr(kept.get((m, n, T)), "tuned", False):
                plan = configs.heuristic_plan(T, m, n, min(m, n), dtype, sms)
                kept[(m, n, T)] = TableEntry(T, m, n, replace(plan, source="given"))
        else:
            kept[(m, n, T)] = tune_shape(m, n, T, dtype, sms, args.quick, print)
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
                      "(configs.heuristic_plan), not measured" if tuned else
                      "heuristic plans (configs.heuristic_plan), not measured: re-tune on the "
                      "GPU with bench/tune_svf.py"))
    out.write_text(json.dumps(configs.table_to_json(entries, arch, meta), indent=1) + "\n")
    configs.parse_table(json.loads(out.read_text()), str(out))     # what we wrote reads back


if __name__ == "__main__":
    main()
