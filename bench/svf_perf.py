"""SVF kernel sweep against its real peers (the GPU performance report of the kernels).

    python bench/svf_perf.py                      # GPU: Llama-3-8B shapes, bf16
    python bench/svf_perf.py --quick              # GPU: T in {1, 64, 4096}, 3 repetitions
    python bench/svf_perf.py --small              # CPU check (interpreter): tiny shapes
    python bench/svf_perf.py --render bench/results/X.json   # re-render X.md from its JSON

For every distinct projection shape and token count T (every token its own mixture, S = T) it
times, weights L2-cold under CUDA graphs (``timing.time_us``):
  * ``dense``   cuBLAS ``x @ Wᵀ`` (the base layer),
  * ``torch``   the bf16 composition ``((x @ Vh.T) * (S * Z[idx]).to(x.dtype)) @ U.T``,
  * ``triton``  t2fast's kernels with a per-slot z table, ``triton_mix`` mixing α in the kernel,
in alternating order over ``--reps`` repetitions (medians), against the byte floor (bytes of U,
Vh, x and y over the measured copy bandwidth) and the FLOP floor (2·T·r·(m+n) over the measured
GEMM rate). It also records the first call's wall time on each shape and bucket (compilation
only: run with an empty ``TRITON_CACHE_DIR`` to see cold compiles) and the error against float64.
Writes ``bench/results/<device>-<date>.json`` and the table rendered from it beside it (``.md``).
CPU numbers (interpreter) only check that the script works; they are never GPU claims.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
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
from t2fast.kernels import svf_matmul as svf_op  # noqa: E402
from timing import CUDA, ceilings, device_tag, time_us  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
VARIANTS = {
    "dense": B.dense,
    "torch": B.torch_composition,
    "triton": B.svf_triton,
    "triton_mix": B.svf_triton_mix,
}


def sweep_shape(m, n, names, T, dtype, ceil, reps) -> dict:
    r = min(m, n)
    copies = B.l2_cold_problems(m, n, T, dtype, DEVICE)
    p0 = copies[0]
    row = dict(matrices="/".join(names), m=m, n=n, r=r, T=T, S=T, copies=len(copies))
    t0 = time.perf_counter()
    B.svf_triton(p0)
    if CUDA:
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    plan = svf_op.svf_plan(p0.x, p0.U, p0.Vh)
    row["plan"] = dict(source=plan.source, backend=plan.backend,
                       launches=plan.launches(T, m, r))
    row["rel_err_triton"] = B.rel_err_vs_f64(p0, B.svf_triton(p0))
    row["rel_err_torch"] = B.rel_err_vs_f64(p0, B.torch_composition(p0))
    samples = {k: [] for k in VARIANTS}
    for rep in range(reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            fn = VARIANTS[name]
            samples[name].append(time_us([lambda p=p: fn(p) for p in copies]))
    for name, ts in samples.items():
        row[f"{name}_us"] = statistics.median(ts)
    row["byte_floor_us"] = (p0.bytes_factors + p0.bytes_io) / (ceil["copy_GBps"] * 1e3)
    row["flop_floor_us"] = p0.flops_factored / (ceil["gemm_TFLOPs"] * 1e6)
    row["x_byte_floor"] = row["triton_us"] / row["byte_floor_us"]
    row["torch_over_triton"] = row["torch_us"] / row["triton_us"]
    row["gemm_rate_frac"] = row["flop_floor_us"] / row["triton_us"]
    return row


def render_markdown(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    lines = [f"# SVF kernels — {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, {result['dtype']}; measured copy "
             f"{ceil['copy_GBps']:.0f} GB/s, GEMM {ceil['gemm_TFLOPs']:.0f} TFLOP/s "
             f"({ceil['gemm_dtype']}). Weights L2-cold, CUDA graphs, medians of "
             f"{result['reps']} alternating repetitions; S = T mixtures. "
             + ("CPU interpreter run: times say nothing about GPU speed." if env["interpreter"]
              else ""),
             "",
             "| matrices | T | dense µs | torch µs | triton µs | mix µs | byte floor µs | "
             "×floor | torch/triton | GEMM frac | rel err | first call s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        lines.append(
            f"| {r['matrices']} | {r['T']} | {r['dense_us']:.1f} | {r['torch_us']:.1f} | "
            f"{r['triton_us']:.1f} | {r['triton_mix_us']:.1f} | {r['byte_floor_us']:.1f} | "
            f"{r['x_byte_floor']:.2f} | {r['torch_over_triton']:.2f} | "
            f"{r['gemm_rate_frac']:.2f} | {r['rel_err_triton']:.1e} | {r['first_call_s']:.2f} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    return {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "cuda": torch.version.cuda,
        "date": dt.date.today().isoformat(),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (CPU check)")
    ap.add_argument("--quick", action="store_true", help="T in {1, 64, 4096}, 3 repetitions")
    ap.add_argument("--T", nargs="*", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, default=None, help="re-render a result JSON's table")
    args = ap.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(
            render_markdown(json.loads(args.render.read_text())))
        return {}
    small = args.small or not CUDA
    model = args.model or ("cpu-small" if small else "llama3-8b")
    Ts = args.T or ((1, 16) if small else (1, 64, 4096) if args.quick else
                    (1, 16, 64, 512, 4096))
    reps = args.reps or (2 if small else 3 if args.quick else 5)
    dtype = torch.bfloat16
    env = environment()
    ceil = ceilings(small)
    print(json.dumps({"environment": env, "ceilings": ceil}))
    shapes = {}
    for name, mn in projections(model).items():
        shapes.setdefault(mn, []).append(name)
    rows = []
    for (m, n), names in shapes.items():
        for T in Ts:
            rows.append(sweep_shape(m, n, names, T, dtype, ceil, reps))
            r = rows[-1]
            print(f"{r['matrices']:>8} T={T:>5} dense {r['dense_us']:8.1f} torch "
                  f"{r['torch_us']:8.1f} triton {r['triton_us']:8.1f} floor "
                  f"{r['byte_floor_us']:7.1f} x{r['x_byte_floor']:.2f} err "
                  f"{r['rel_err_triton']:.1e} first {r['first_call_s']:.2f}s", flush=True)
    result = {"environment": env, "model": model, "dtype": str(dtype).replace("torch.", ""),
              "reps": reps, "ceilings": ceil, "kernels": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_tag(env['device'])}-{env['date']}" + ("-small" if small else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(render_markdown(result))
    print(f"wrote {args.out / (stem + '.json')}")
    return result


if __name__ == "__main__":
    main()
