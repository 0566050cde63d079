"""SVF kernel sweep against its real peers (the GPU performance report of the kernels).

    python bench/svf_perf.py                      # GPU: Llama-3-8B shapes, bf16
    python bench/svf_perf.py --quick              # GPU: T in {1, 16, 64, 4096}, 3 repetitions
    python bench/svf_perf.py --small              # CPU check (interpreter): tiny shapes
    python bench/svf_perf.py --render bench/results/X.json   # re-render X.md from its JSON

For every op of a decoder layer — the q/k/v group, o, the gate/up group, down, as the layers run
them (``t2fast.ops.svf_group``) — then for the whole ``layer`` (all seven matrices: the four
ops in a row), and every token count T (every token its own mixture, S = T) it times, weights
L2-cold under CUDA graphs (``timing.time_us``):
  * ``dense``   cuBLAS ``x @ Wᵀ`` on the fused weight (the base layer),
  * ``torch``   the bf16 composition ``((x @ Vh.T) * (S * Z[idx]).to(x.dtype)) @ U.T``,
  * ``triton``  t2fast's grouped kernels with a per-slot z table, ``triton_mix`` mixing α in the
    kernel (what the vLLM layers run),
in alternating order over ``--reps`` repetitions (medians), against the byte floor (bytes of U,
Vh, x and y over the measured copy bandwidth) and the FLOP floor (2·T·Σ r_i·(m_i+n) over the
measured GEMM rate); ``x_byte_floor`` is the Triton time over the byte floor. It also records
the first call's wall time on each op and bucket (compilation only: run with an empty
``TRITON_CACHE_DIR`` to see cold compiles) and the error against float64.
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
from shapes import groups  # noqa: E402
from t2fast.kernels import shrink_expand  # noqa: E402
from t2fast.ops.reference import svf_group_reference  # noqa: E402
from timing import CUDA, ceilings, device_tag, time_us, write_text  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
VARIANTS = {
    "dense": B.group_dense,
    "torch": B.group_composition,
    "triton": B.group_triton,
    "triton_mix": B.group_triton_mix,
}
# The ops of a layer as the sweep names them.
OP_NAMES = {"qkv": "q/k/v", "o": "o", "gate_up": "gate/up", "down": "down"}


def rel_err_vs_f64(p: B.GroupProblem, y: torch.Tensor) -> float:
    """max |y − y64| / max |y64| against a float64 reference on the same inputs."""
    ref = svf_group_reference(p.x.double(), [U.double() for U in p.Us], p.S.double(),
                              p.Vh.double(), p.Z.double(), p.idx)
    return float((y.double() - ref).abs().max() / ref.abs().max())


def _bytes(p: B.GroupProblem) -> int:
    T = p.x.shape[0]
    out = sum(U.shape[0] for U in p.Us)
    return p.bytes_factors + (p.x.numel() + T * out) * p.x.element_size()


def timed_row(row: dict, copies: list, run, ceil, reps, byte_count: int, flops: int) -> dict:
    """Time ``run(variant, copy)`` for every variant (alternating order) and add the floors."""
    samples = {k: [] for k in VARIANTS}
    for rep in range(reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            samples[name].append(time_us([lambda c=c, name=name: run(name, c) for c in copies]))
    for name, ts in samples.items():
        row[f"{name}_us"] = statistics.median(ts)
    row["byte_floor_us"] = byte_count / (ceil["copy_GBps"] * 1e3)
    row["flop_floor_us"] = flops / (ceil["gemm_TFLOPs"] * 1e6)
    row["x_byte_floor"] = row["triton_us"] / row["byte_floor_us"]
    row["torch_over_triton"] = row["torch_us"] / row["triton_us"]
    row["gemm_rate_frac"] = row["flop_floor_us"] / row["triton_us"]
    return row


def sweep_op(name: str, slices, T, dtype, ceil, reps) -> tuple[dict, list]:
    """One op of a layer (``slices`` [(m_i, n)]) at T tokens; returns its row and its copies."""
    copies = B.l2_cold_groups(slices, T, dtype, DEVICE)
    p0 = copies[0]
    m, n = sum(s[0] for s in slices), slices[0][1]
    R = p0.S.shape[0]
    row = dict(matrices=OP_NAMES.get(name, name), m=m, n=n, r=R, T=T, S=T, copies=len(copies))
    t0 = time.perf_counter()
    B.group_triton(p0)
    if CUDA:
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    plan = shrink_expand.group_plan(p0.x, p0.Us, p0.Vh)
    row["plan"] = dict(source=plan.source, backend=plan.backend,
                       launches=plan.launches(T, [U.shape[0] for U in p0.Us], R))
    row["rel_err_triton"] = rel_err_vs_f64(p0, B.group_triton(p0))
    row["rel_err_torch"] = rel_err_vs_f64(p0, B.group_composition(p0))
    timed_row(row, copies, lambda v, p: VARIANTS[v](p), ceil, reps, _bytes(p0),
              p0.flops_factored)
    return row, copies


def layer_row(op_copies: dict, T: int, ceil, reps) -> dict:
    """All seven matrices of one layer: the four ops back to back (``matrices: "layer"``)."""
    count = min(len(c) for c in op_copies.values())
    layer_copies = [[c[i] for c in op_copies.values()] for i in range(count)]
    firsts = [c[0] for c in op_copies.values()]
    row = dict(matrices="layer", m=sum(sum(U.shape[0] for U in p.Us) for p in firsts),
               n=firsts[0].x.shape[1], r=sum(p.S.shape[0] for p in firsts), T=T, S=T,
               copies=count, first_call_s=0.0,
               launches=sum(len(shrink_expand.group_plan(p.x, p.Us, p.Vh).launches(
                   T, [U.shape[0] for U in p.Us], p.S.shape[0])) for p in firsts),
               rel_err_triton=max(rel_err_vs_f64(p, B.group_triton(p)) for p in firsts),
               rel_err_torch=max(rel_err_vs_f64(p, B.group_composition(p)) for p in firsts))

    def run(variant, ps):
        for p in ps:
            VARIANTS[variant](p)

    return timed_row(row, layer_copies, run, ceil, reps, sum(_bytes(p) for p in firsts),
                     sum(p.flops_factored for p in firsts))


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
    ap.add_argument("--quick", action="store_true", help="T in {1, 16, 64, 4096}, 3 repetitions")
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
    Ts = args.T or ((1, 16) if small else (1, 16, 64, 4096) if args.quick else
                    (1, 16, 64, 512, 4096))
    reps = args.reps or (2 if small else 3 if args.quick else 5)
    dtype = torch.bfloat16
    env = environment()
    ceil = ceilings(small)
    print(json.dumps({"environment": env, "ceilings": ceil}))
    rows = []

    def report(r):
        rows.append(r)
        print(f"{r['matrices']:>8} T={r['T']:>5} dense {r['dense_us']:8.1f} torch "
              f"{r['torch_us']:8.1f} triton {r['triton_us']:8.1f} floor "
              f"{r['byte_floor_us']:7.1f} x{r['x_byte_floor']:.2f} err "
              f"{r['rel_err_triton']:.1e} first {r['first_call_s']:.2f}s", flush=True)

    result = {"environment": env, "model": model, "dtype": str(dtype).replace("torch.", ""),
              "reps": reps, "ceilings": ceil, "kernels": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_tag(env['device'])}-{env['date']}" + ("-small" if small else "")
    for T in Ts:
        op_copies = {}
        for name, slices in groups(model).items():
            row, op_copies[name] = sweep_op(name, slices, T, dtype, ceil, reps)
            report(row)
        report(layer_row(op_copies, T, ceil, reps))
        del op_copies
        # after every T: a run cut off by its time limit keeps what it measured
        write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
        write_text(args.out / f"{stem}.md", render_markdown(result))
    print(f"wrote {args.out / (stem + '.json')}")
    return result


if __name__ == "__main__":
    main()
