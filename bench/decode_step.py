"""End-to-end decode step of a Llama with 8B layer shapes: does a per-row mixture cost what the
bytes say, and nothing more?

    python bench/decode_step.py                 # GPU: 4 layers, bf16, batch 1/8/32/64, context 512
    python bench/decode_step.py --small         # CPU check: tiny dims, eager steps

One decode step (one new token per row, static KV cache of ``context + 8`` positions) is captured
in a CUDA graph for each variant, after a warm-up on a side stream:
  * ``unpatched``     the model as built (the reference of every ratio),
  * ``per_row``       all seven projections patched, every row its own mixture (S = batch),
  * ``per_row_mlp``   only gate/up/down patched, every row its own mixture,
  * ``lean_base``     patched with ``keep_dense=False`` (no dense copy kept), base mixture
                      through the factored kernels.
A captured graph always runs the factored kernels (``hybrid``'s dense weights serve eager calls
only), so a single mixture or the base mixture costs what ``lean_base`` costs.
The per-row graph is replayed after the mixtures are changed with ``set_mixture`` (persistent
buffers updated in place), and the script checks the logits changed: one graph serves any
assignment of mixtures to rows. Variants are timed in alternating order, ``--reps`` repetitions of
``--steps`` replays each; medians, and ratios to ``unpatched`` measured in the same process. GPU
memory held by each mode is reported from ``handle.memory_report()``. Writes
``bench/results/decode-<device>-<date>.json``. CPU numbers only check the script.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TRITON_INTERPRET", "0")     # on the CPU, backend "auto" runs torch ops

import torch  # noqa: E402

from shapes import MODELS  # noqa: E402
from timing import capture_graph, device_tag  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_EXPERTS = 4


def table_note() -> str | None:
    """The ``note`` of the kernel config table this GPU's plans come from (how many of its
    entries are tuned); None on the CPU or without a shipped table."""
    if not CUDA:
        return None
    from t2fast.kernels import configs
    arch, _ = configs.device_arch(DEVICE)
    path = configs.CONFIG_DIR / f"{arch}.json"
    return json.loads(path.read_text()).get("note") if path.exists() else None


def build_model(model: str, layers: int, dtype, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = MODELS[model]
    cfg = LlamaConfig(hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return LlamaForCausalLM(cfg).to(dtype).eval()


class DecodeStep:
    """A prefilled static KV cache and static inputs for one decode step of ``batch`` rows."""

    def __init__(self, lm, batch: int, context: int):
        from transformers import StaticCache
        self.lm = lm
        self.cache = StaticCache(config=lm.config, max_cache_len=context + 8)
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, lm.config.vocab_size, (batch, context), generator=g)
        with torch.no_grad():
            lm(input_ids=prompt.to(DEVICE), past_key_values=self.cache, use_cache=True,
               cache_position=torch.arange(context, device=DEVICE), logits_to_keep=1)
        self.tok = torch.randint(0, lm.config.vocab_size, (batch, 1), generator=g).to(DEVICE)
        self.pos = torch.full((batch, 1), context, device=DEVICE)
        self.cache_pos = torch.tensor([context], device=DEVICE)
        # Recent transformers write at a per-layer device counter instead of cache_position:
        # rewind it in the step itself, so every replay writes position `context` again.
        self.counters = [c for c in (getattr(layer, "cumulative_length", None)
                                     for layer in getattr(self.cache, "layers", []))
                         if isinstance(c, torch.Tensor)]
        self.context = context

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        for c in self.counters:
            c.fill_(self.context)
        return self.lm(input_ids=self.tok, position_ids=self.pos, cache_position=self.cache_pos,
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits


class Captured:
    """A step captured in a CUDA graph (on the CPU: the eager step), with its static output.

    If capture fails, the step runs eagerly and ``error`` says why (recorded in the results).
    """

    def __init__(self, step):
        self.graph, self.error = None, None
        if CUDA:
            try:
                self.graph, self.out = capture_graph(step, warmup=3)
                self.step = self.graph.replay
            except Exception as exc:  # noqa: BLE001 - reported, then timed eagerly
                self.error = f"{type(exc).__name__}: {exc}"[:500]
                torch.cuda.synchronize()
        if self.graph is None:
            step()
            self.step = lambda: setattr(self, "out", step())
        self.step()

    def time_us(self, steps: int) -> float:
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                self.step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) * 1e6 / steps


def random_mixtures(batch: int, seed: int) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(NUM_EXPERTS, generator=g), 0).tolist() for _ in range(batch)]


def add_random_experts(handle) -> None:
    from t2fast.experts import Expert
    f = handle.decomposition.factors
    handle.add_experts([handle.new_expert(f"e{k}", Expert.random(f"e{k}", f, 0.1, k).z)
                        for k in range(NUM_EXPERTS)])


def run_batch(lm, batch: int, context: int, steps: int, reps: int, cache_dir: str) -> dict:
    """Every variant for one batch size.

    Each variant patches its own copy of ``lm`` and keeps it (and its KV cache) alive until the
    timing ends: a captured graph replays the kernels and buffers of its capture, so the model
    behind it must not be restored or freed while the graph is in use.
    """
    import copy

    import t2fast
    graphs, memory, notes, keep = {}, {}, {}, []

    def allocated() -> int:
        if CUDA:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return 0

    def capture(name: str, targets=None, keep_dense=True, per_row=False):
        """Patch a copy of ``lm`` (``targets`` None: the unpatched model), set random per-row
        mixtures (else the base mixture), prefill its cache and capture its step."""
        before = allocated()
        model, handle = lm if targets is None else copy.deepcopy(lm), None
        if targets is not None:
            handle = t2fast.patch_model(model, targets=targets, cache_dir=cache_dir,
                                        progress=False, keep_dense=keep_dense)
            add_random_experts(handle)
            handle.set_mixture(random_mixtures(batch, 1) if per_row else None)
            memory[name] = handle.memory_report()
        step = DecodeStep(model, batch, context)
        graphs[name] = Captured(step)
        keep.append((model, handle, step))
        memory[f"cuda_allocated_delta_{name}"] = allocated() - before
        return handle

    capture("unpatched")
    h = capture("per_row", "all", per_row=True)
    before = graphs["per_row"].out.clone()
    h.set_mixture(random_mixtures(batch, 2))           # new assignment, same graph
    graphs["per_row"].step()
    notes["per_row_graph_follows_set_mixture"] = not torch.equal(before, graphs["per_row"].out)
    capture("per_row_mlp", "mlp", per_row=True)
    capture("lean_base", "all", keep_dense=False)

    samples = {k: [] for k in graphs}
    for rep in range(reps):
        order = list(graphs) if rep % 2 == 0 else list(reversed(graphs))
        for name in order:
            graphs[name].time_us(max(1, steps // 10))     # warm-up before each timed series
            samples[name].append(graphs[name].time_us(steps))
    us = {k: statistics.median(v) for k, v in samples.items()}
    out = dict(batch=batch, context=context, step_us=us,
               tok_s={k: batch * 1e6 / v for k, v in us.items()},
               ratio_to_unpatched={k: us["unpatched"] / v for k, v in us.items()},
               memory=memory,
               capture_errors={k: g.error for k, g in graphs.items() if g.error}, **notes)
    del graphs, keep
    if CUDA:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", nargs="*", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="replays per timed series")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny dims, eager (CPU check)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    small = args.small or not CUDA
    model = args.model or ("cpu-small" if small else "llama3-8b")
    batches = args.batch or ([1, 4] if small else [1, 8, 32, 64])
    context = args.context or (16 if small else 512)
    steps = args.steps or (3 if small else 50)
    dtype = torch.bfloat16 if CUDA else torch.float32
    lm = build_model(model, args.layers if not small else 1, dtype, 32000 if CUDA else 256)
    result = dict(device=torch.cuda.get_device_name() if CUDA else "cpu",
                  date=dt.date.today().isoformat(), torch=torch.__version__, model=model,
                  layers=lm.config.num_hidden_layers, dtype=str(dtype).replace("torch.", ""),
                  cuda_graphs=CUDA, reps=args.reps, steps=steps, config_table=table_note(),
                  runs=[])
    with tempfile.TemporaryDirectory() as cache_dir:
        for b in batches:
            run = run_batch(lm, b, context, steps, args.reps, cache_dir)
            result["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("batch", "step_us", "ratio_to_unpatched")}),
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{device_tag(result['device'])}-{result['date']}" + ("-small" if small else "")
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
