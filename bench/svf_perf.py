"""One-call performance survey of t2fast's SVF paths (the GPU performance report).

    python bench/svf_perf.py                      # GPU: Llama-3-8B shapes, bf16, full sweep
    python bench/svf_perf.py --small              # CPU check: scaled-down shapes, few points

Measures, prints as a table, and writes ``bench/results/<device>-<date>.json`` plus
``bench/RESULTS.md`` (and a PNG plot when matplotlib is installed):
  * the card's ceilings: device-to-device copy bandwidth, bf16 GEMM rate (cuBLAS);
  * svf_matmul for every distinct projection shape, T in {1..4096}, S = T and S = 1 mixtures,
    against the byte floor (bytes of U, Vh, x, y over copy bandwidth), the FLOP floor, cuBLAS
    dense x @ Wᵀ, the unfused torch reference, materializing W′ per mixture (S ≤ 64), and the
    merged single-mixture path; the α-in-kernel variant against a per-slot z table;
  * correctness of the triton result against a float64 reference at every shape timed;
  * end to end: a Hugging Face Llama with 8B layer shapes (``--e2e-layers`` layers, random
    weights), greedy decode at batch 32: unpatched vs per-row α mixtures vs one merged mixture.

On a CUDA device kernels are timed with CUDA graphs (``triton.testing.do_bench_cudagraph``);
on the CPU with wall-clock medians (the triton backend runs through the interpreter there, so
CPU figures only check that the script works; they are never GPU claims).
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
from shapes import MODELS, projections  # noqa: E402
from t2fast import ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def bench_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA graphs on GPU, wall clock on CPU)."""
    if CUDA:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=reps * 5))
        except Exception:   # not capturable (host syncs): plain events
            return float(triton.testing.do_bench(fn, rep=reps * 5))
    fn()
    times = []
    for _ in range(max(3, reps // 4)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(small: bool) -> dict:
    n = (1 << 24) if small else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    copy_gbs = 2 * n / ms / 1e6
    k = 512 if small else 8192
    dtype = torch.float32 if not CUDA else torch.bfloat16
    x = torch.randn(k, k, device=DEVICE, dtype=dtype)
    w = torch.randn(k, k, device=DEVICE, dtype=dtype)
    ms = bench_ms(lambda: x @ w)
    return {"copy_GBps": copy_gbs, "gemm_TFLOPs": 2 * k ** 3 / ms / 1e9, "gemm_dtype": str(dtype)}


def check_correct(p: B.Problem, y: torch.Tensor) -> float:
    """Max |y − y64| / max |y64| against a float64 reference."""
    from t2fast.ops import reference
    ref = reference.svf_matmul(p.x.double(), p.U.double(), p.S.double(), p.Vh.double(),
                               p.Z.double(), p.idx)
    return float((y.double() - ref).abs().max() / ref.abs().max())


def kernel_sweep(model: str, Ts, dtype, ceil, triton_max_T) -> list[dict]:
    mats = projections(model)
    shapes = {}
    for name, mn in mats.items():          # one row per distinct shape
        shapes.setdefault(mn, []).append(name)
    rows = []
    for (m, n), names in shapes.items():
        for T in Ts:
            for S in sorted({T, 1}):
                p = B.make_problem(m, n, T, S, dtype=dtype, device=DEVICE)
                row = dict(matrices="/".join(names), m=m, n=n, r=min(m, n), T=T, S=S)
                row["dense_ms"] = bench_ms(lambda: B.dense(p))
                row["unfused_ms"] = bench_ms(lambda: B.unfused_torch(p))
                if S <= 64:
                    row["materialize_ms"] = bench_ms(lambda: B.materialize_per_mixture(p))
                W1 = ops.svf_merge(p.U, p.S, p.Z[0], p.Vh, backend="torch")
                row["merged_ms"] = bench_ms(lambda: B.merged_dense(p, W1))
                if T <= triton_max_T:
                    row["triton_ms"] = bench_ms(lambda: B.svf_triton(p))
                    row["triton_mix_ms"] = bench_ms(lambda: B.svf_triton_mix(p))
                    row["rel_err_vs_f64"] = check_correct(p, B.svf_triton(p))
                    row["rel_err_mix_vs_f64"] = check_correct(p, B.svf_triton_mix(p))
                byte_floor_ms = (p.bytes_factors + p.bytes_io) / (ceil["copy_GBps"] * 1e6)
                flop_floor_ms = p.flops_factored / (ceil["gemm_TFLOPs"] * 1e9)
                row["byte_floor_ms"] = byte_floor_ms
                row["flop_floor_ms"] = flop_floor_ms
                if "triton_ms" in row:
                    t = row["triton_ms"]
                    row["x_byte_floor"] = t / byte_floor_ms
                    row["x_dense_bytes"] = t / (row["dense_ms"] * p.bytes_factors /
                                                (p.W.numel() * p.W.element_size()))
                    row["gemm_rate_frac"] = p.flops_factored / (t * 1e9) / ceil["gemm_TFLOPs"]
                    row["GBps_factors"] = p.bytes_factors / t / 1e6
                    row["speedup_vs_unfused"] = row["unfused_ms"] / t
                    if "materialize_ms" in row:
                        row["speedup_vs_materialize"] = row["materialize_ms"] / t
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    def f(k, w=8):
        v = r.get(k)
        return f"{v:{w}.3f}" if isinstance(v, float) else " " * (w - 1) + "-"
    return (f"{r['matrices']:>14} T={r['T']:>5} S={r['S']:>5} | dense {f('dense_ms')} "
            f"triton {f('triton_ms')} mix {f('triton_mix_ms')} unfused {f('unfused_ms')} "
            f"mat {f('materialize_ms')} merged {f('merged_ms')} | x_floor {f('x_byte_floor', 6)} "
            f"err {r.get('rel_err_vs_f64', float('nan')):.1e}")


def end_to_end(model: str, layers: int, batch: int, new_tokens: int, dtype) -> dict:
    """Greedy decode tokens/s: unpatched vs per-row mixtures vs one merged mixture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import t2fast
    from t2fast.experts import Expert
    d = MODELS[model]
    cfg = LlamaConfig(hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      num_hidden_layers=layers, vocab_size=32000 if CUDA else 512,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        lm = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, 16), device=DEVICE)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def tok_s():
        lm.generate(ids, attention_mask=mask, **dict(gen, max_new_tokens=2, min_new_tokens=2))
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.generate(ids, attention_mask=mask, **gen)
        if CUDA:
            torch.cuda.synchronize()
        return batch * new_tokens / (time.perf_counter() - t0)

    out = {"layers": layers, "batch": batch, "new_tokens": new_tokens, "cuda_graphs": False}
    out["base_tok_s"] = tok_s()
    h = t2fast.patch_model(lm, cache_dir=False, progress=False)
    f = h.decomposition.factors
    h.add_experts([h.new_expert(f"e{k}", Expert.random(f"e{k}", f, 0.1, k).z) for k in range(4)])
    g = torch.Generator().manual_seed(1)
    h.set_mixture([torch.softmax(torch.randn(4, generator=g), 0).tolist() for _ in range(batch)])
    out["per_row_tok_s"] = tok_s()
    h.merge([0.25, 0.25, 0.25, 0.25])
    out["merged_tok_s"] = tok_s()
    out["per_row_over_base"] = out["per_row_tok_s"] / out["base_tok_s"]
    out["merged_over_base"] = out["merged_tok_s"] / out["base_tok_s"]
    return out


def environment() -> dict:
    import transformers
    return {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "date": dt.date.today().isoformat(),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def write_markdown(result: dict, path: Path) -> None:
    env, ceil = result["environment"], result["ceilings"]
    lines = [f"# SVF kernel results — {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}; copy {ceil['copy_GBps']:.0f} GB/s, "
             f"GEMM {ceil['gemm_TFLOPs']:.1f} TFLOP/s ({ceil['gemm_dtype']}).", "",
             "| matrices | T | S | dense ms | triton ms | ×byte floor | ×(ratio·dense) | "
             "GEMM frac | vs unfused | vs materialize | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        def f(k, fmt=".3f"):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, float) else "-"
        lines.append(f"| {r['matrices']} | {r['T']} | {r['S']} | {f('dense_ms')} | "
                     f"{f('triton_ms')} | {f('x_byte_floor', '.2f')} | {f('x_dense_bytes', '.2f')} "
                     f"| {f('gemm_rate_frac', '.2f')} | {f('speedup_vs_unfused', '.1f')} | "
                     f"{f('speedup_vs_materialize', '.1f')} | {f('rel_err_vs_f64', '.1e')} |")
    e2e = result.get("end_to_end")
    if e2e:
        lines += ["", f"End to end ({e2e['layers']} layers, batch {e2e['batch']}, "
                      f"{e2e['new_tokens']} new tokens, CUDA graphs: {e2e['cuda_graphs']}): base "
                      f"{e2e['base_tok_s']:.0f} tok/s, per-row mixtures {e2e['per_row_tok_s']:.0f} "
                      f"({e2e['per_row_over_base']:.2f}×), merged {e2e['merged_tok_s']:.0f} "
                      f"({e2e['merged_over_base']:.2f}×)."]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for mats in sorted({r["matrices"] for r in result["kernels"]}):
        pts = [(r["T"], r["x_byte_floor"]) for r in result["kernels"]
               if r["matrices"] == mats and r["S"] == r["T"] and "x_byte_floor" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mats)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T (S = T mixtures)")
    ax.set_ylabel("triton time / byte floor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (CPU check)")
    ap.add_argument("--e2e-layers", type=int, default=4)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    small = args.small or not CUDA
    model = args.model or ("cpu-small" if small else "llama3-8b")
    dtype = torch.bfloat16 if CUDA else torch.float32
    Ts = (1, 16, 64) if small else (1, 8, 32, 64, 256, 1024, 4096)
    triton_max_T = 16 if not CUDA else 1 << 30
    env = environment()
    ceil = ceilings(small)
    print(json.dumps({"environment": env, "ceilings": ceil}, indent=1))
    result = {"environment": env, "model": model, "dtype": str(dtype), "ceilings": ceil,
              "kernels": kernel_sweep(model, Ts, dtype, ceil, triton_max_T)}
    if not args.no_e2e:
        result["end_to_end"] = end_to_end(model, 1 if small else args.e2e_layers,
                                          4 if small else 32, 4 if small else 64, dtype)
        print(json.dumps(result["end_to_end"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    stem = f"{tag}-{env['date']}" + ("-small" if small else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, (HERE / "RESULTS.md") if CUDA else args.out / f"{stem}.md")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')}")
    return result


if __name__ == "__main__":
    main()
