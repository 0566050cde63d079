"""Bounded loopback load test of ``t2fast serve``: mixed experts vs all base vs plain vLLM.

    python bench/serve_load.py                       # the bundled tiny model and experts
    python bench/serve_load.py --requests 200 --concurrency 32 --json results/serve_load.json
    python bench/serve_load.py --model PATH --experts a.safetensors b.safetensors --compiled

One run starts two servers in turn on 127.0.0.1 (never another address): ``t2fast serve`` with
the experts, then vLLM's own ``serve`` on the same model with the same engine options. Against
each it sends ``--requests`` completions with at most ``--concurrency`` in flight and stops
issuing new ones after ``--max-seconds`` (each scenario is bounded in count and time):

* ``t2fast-mixed``: requests cycle through every expert, two α mixtures and the base model;
* ``t2fast-base``: every request on the base model;
* ``vllm-plain``: the same base requests against plain vLLM.

It prints (and with ``--json`` writes) per scenario: requests sent and answered, errors, wall
time, requests/s, completion tokens/s, p50 and p99 latency. Requests are greedy with
``ignore_eos`` so every one produces ``--max-tokens`` tokens. Numbers depend on the machine and
its load; compare scenarios of one run only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Q: 47+85=?\nA: ", "Q: reverse('kdfa')\nA: ",
           "Q: Which is largest? A)34 B)71 C)12 D)55\nA: ", "Q: 80-14=?\nA: ",
           "Q: sort('bcad')\nA: ", "Q: tell me about the quiet river\nA: "]


def mixtures(experts: list[str]) -> list[dict]:
    """The request fields the mixed scenario cycles through."""
    out = [{"t2_expert": e} for e in experts] + [{}]
    if len(experts) >= 2:
        out += [{"t2_alpha": {experts[0]: 0.5, experts[1]: 0.5}},
                {"t2_alpha": {experts[0]: 1.2, "base": -0.2}}]
    return out


async def run_scenario(url: str, model: str, fields: list[dict], args) -> dict:
    """Send ``args.requests`` requests (cycling ``fields``), ``args.concurrency`` at a time."""
    import httpx

    latencies, errors, tokens = [], [], 0
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.perf_counter() + args.max_seconds
    sent = 0

    async def one(client, i):
        nonlocal tokens
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
                "max_tokens": args.max_tokens, "ignore_eos": True, **fields[i % len(fields)]}
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")
            return
        latencies.append(time.perf_counter() - t0)
        tokens += r.json()["usage"]["completion_tokens"]

    async def guarded(client, i):
        nonlocal sent
        async with sem:
            if time.perf_counter() < deadline:
                sent += 1
                await one(client, i)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=args.max_seconds + 60) as client:
        await asyncio.gather(*(guarded(client, i) for i in range(args.requests)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return round(1e3 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    return {"requests": sent, "answered": len(lat), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2) if wall else None,
            "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": round(1e3 * statistics.fmean(lat), 1) if lat else None}


def expert_names(paths: list[str]) -> list[str]:
    from t2fast.vllm.frontend import expert_file_name

    return [expert_file_name(p) for p in paths]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a checkpoint folder")
    p.add_argument("--experts", nargs="+",
                   default=[str(ROOT / "experts" / f"{n}.safetensors")
                            for n in ("arith", "strings", "choice")])
    p.add_argument("--requests", type=int, default=96, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request")
    p.add_argument("--max-seconds", type=float, default=180.0,
                   help="per scenario: no new request after this many seconds")
    p.add_argument("--compiled", action="store_true",
                   help="torch.compile / CUDA graphs (default: --enforce-eager)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--log-dir", default="/tmp/t2fast-serve-load", help="server logs")
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    from t2fast.serve.launch import ServerProcess, t2fast_serve_command, vllm_serve_command

    engine = [] if args.compiled else ["--enforce-eager"]
    engine += [f"--max-num-seqs={args.concurrency}", "--seed=0"]
    env = {"VLLM_DISABLE_COMPILE_CACHE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRITON_INTERPRET": None}  # the interpreter is for kernel tests, not servers
    names = expert_names(args.experts)
    results = {"config": {k: v for k, v in vars(args).items() if k != "log_dir"},
               "experts": names}
    log_dir = Path(args.log_dir)

    with ServerProcess(t2fast_serve_command(args.model, "--experts", *args.experts, *engine),
                       log_dir / "t2fast.log", env=env) as server:
        served = "tiny" if args.model == "tiny" else args.model
        for scenario, fields in (("t2fast-mixed", mixtures(names)), ("t2fast-base", [{}])):
            results[scenario] = asyncio.run(run_scenario(server.url, served, fields, args))
            print(scenario, json.dumps(results[scenario]), flush=True)

    model, plain = args.model, []
    if args.model == "tiny":
        from t2fast.models import tiny_model_path

        model, plain = str(tiny_model_path()), ["--served-model-name", "tiny", "--dtype",
                                                 "float32"]
    from t2fast.serve.cli import cpu_defaults

    with ServerProcess(vllm_serve_command(model, *plain, *engine, *cpu_defaults(engine)),
                       log_dir / "vllm.log", env=env) as server:
        results["vllm-plain"] = asyncio.run(run_scenario(server.url, "tiny" if plain else model,
                                                         [{}], args))
        print("vllm-plain", json.dumps(results["vllm-plain"]), flush=True)

    base = results["vllm-plain"]["requests_per_s"]
    for scenario in ("t2fast-mixed", "t2fast-base"):
        mine = results[scenario]["requests_per_s"]
        results[scenario]["vs_plain_vllm"] = round(mine / base, 3) if base and mine else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("t2fast-mixed", "t2fast-base", "vllm-plain")},
                     indent=2))
    return 0 if all(results[k]["errors"] == 0 for k in ("t2fast-mixed", "t2fast-base",
                                                        "vllm-plain")) else 1


if __name__ == "__main__":
    sys.exit(main())
