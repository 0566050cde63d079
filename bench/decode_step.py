"""End-to-end decode step of Llama-3-8B (32 layers, vocabulary 128256, bf16, random weights):
does a per-row mixture cost what the bytes say, and nothing more?

    python bench/decode_step.py                 # GPU: the full model, batch 1/8/32/64, context 512
    python bench/decode_step.py --small         # CPU check: tiny dims, eager steps

One decode step (one new token per row, static KV cache of ``context + 8`` positions) is captured
in a CUDA graph for each variant, after a warm-up on a side stream:
  * ``unpatched``  the model as built (the reference of every ratio),
  * ``per_row``    all seven projections of every layer patched, every row its own mixture
                   (S = batch), through the factored kernels,
  * ``merged``     the same patched model serving one mixture through dense merged weights
                   (``handle.merge``); a captured graph normally takes the factored path, so this
                   variant is captured with the dense path eager calls take.
The per-row graph is replayed after the mixtures are changed with ``set_mixture`` (persistent
buffers updated in place), and the script checks the logits changed: one graph serves any
assignment of mixtures to rows. Variants are timed in alternating order, ``--reps`` repetitions of
``--steps`` replays each; medians, and ratios to ``unpatched`` measured in the same process.

Every layer holds the same random weights (``tied_layers`` in the results), so each of the four
distinct shapes is decomposed once (224 SVDs of 8B shapes would not fit a short GPU loan); the
layers then also share their U and Vh. One layer reads 0.4-0.7 GB, far beyond L2, so every layer
still streams its weights from memory and the step's bytes are the untied model's. The merged
weights are distinct per layer. ``byte_limit`` per batch is the ratio the bytes allow: dense
weights + lm_head + KV cache over the same with U + Vh in place of the seven adapted matrices
(``merged``: 1). Writes ``bench/results/decode-<device>-<date>.json``. CPU numbers only check the
script.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import re
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
from timing import capture_graph, device_tag, write_text  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_EXPERTS = 4


def table_note() -> str | None:
    """The ``note`` of the kernel config table this GPU's plans come from (how many of its
    entries are tuned); None on the CPU or without a shipped table."""
    if not CUDA:
        return None
    from t2fast.kernels import plans
    arch, _ = plans.device_arch(DEVICE)
    path = plans.CONFIG_DIR / f"{arch}.json"
    return json.loads(path.read_text()).get("note") if path.exists() else None


def build_model(model: str, layers: int, dtype, vocab: int):
    """A random Llama of ``model``'s shapes whose layers all hold layer 0's weights (tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = MODELS[model]
    cfg = LlamaConfig(hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        lm = LlamaForCausalLM(cfg).to(dtype).eval()
    first = lm.model.layers[0]
    for layer in lm.model.layers[1:]:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight = first.get_submodule(name).weight
    return lm


def byte_limit(model: str, layers: int, vocab: int, batch: int, context: int) -> dict:
    """The step-time ratio to ``unpatched`` that the bytes allow, from the shapes (bf16): every
    weight, the lm_head and the KV cache read once per step, with U [m, r] + Vh [r, n]
    (r = min(m, n)) in place of each adapted W [m, n] for ``per_row``."""
    from shapes import projections
    d = MODELS[model]
    dense = factored = 0
    for m, n in projections(model).values():
        r = min(m, n)
        dense += m * n
        factored += r * (m + n)
    kv = 2 * d["kv_heads"] * (d["hidden"] // d["heads"]) * context * batch
    other = vocab * d["hidden"] + layers * kv
    return {"per_row": (layers * dense + other) / (layers * factored + other), "merged": 1.0}


def tied_decomposition(decompose_model, memo: dict):
    """``patch_model``'s ``decompose_model`` with one SVD per matrix of a layer (every layer,
    and every copy of the model, holds the same weights): ``memo`` maps a matrix's name within
    its layer (``self_attn.q_proj``) to its decomposition."""
    from t2fast.decompose import Decomposition
    from t2fast.targets import resolve_targets

    def decompose(model, targets, layers, **kw):
        factors, errors = {}, {}
        for name in resolve_targets(model, targets, layers):
            key = re.sub(r"^.*?layers\.\d+\.", "", name)
            if key not in memo:
                memo[key] = decompose_model(model, [name], None, **kw)
            (first,) = memo[key].factors
            factors[name], errors[name] = memo[key].factors[first], memo[key].errors[first]
        return Decomposition(factors, errors)

    return decompose


class DecodeStep:
    """A prefilled static KV cache and static inputs for one decode step of ``batch`` rows."""

    def __init__(self, lm, batch: int, context: int):
        from transformers import StaticCache

        from t2fast.generation import cache_field
        self.lm = lm
        self.cache = StaticCache(config=lm.config, max_cache_len=context + 8)
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, lm.config.vocab_size, (batch, context), generator=g)
        with torch.no_grad():
            lm(input_ids=prompt.to(DEVICE), use_cache=True, **{cache_field(lm): self.cache},
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
        self.cache_kw = {cache_field(lm): self.cache}

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        for c in self.counters:
            c.fill_(self.context)
        return self.lm(input_ids=self.tok, position_ids=self.pos, cache_position=self.cache_pos,
                       use_cache=True, logits_to_keep=1, **self.cache_kw).logits


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


def run_batch(lm, model: str, batch: int, context: int, steps: int, reps: int,
              cache_dir: str, svd_memo: dict) -> dict:
    """Every variant for one batch size.

    The patched copy of ``lm`` and every step (with its KV cache) stay alive until the timing
    ends: a captured graph replays the kernels and buffers of its capture.
    """
    import copy

    import t2fast
    import t2fast.layers as svf_layers
    pm = sys.modules["t2fast.patching"]
    graphs, notes, keep = {}, {}, []

    def capture(name, target):
        step = DecodeStep(target, batch, context)
        graphs[name] = Captured(step)
        keep.append(step)

    capture("unpatched", lm)
    patched = copy.deepcopy(lm)
    real = pm.decompose_model
    pm.decompose_model = tied_decomposition(real, svd_memo)
    try:
        handle = t2fast.patch_model(patched, targets="all", cache_dir=cache_dir, progress=False)
    finally:
        pm.decompose_model = real
    add_random_experts(handle)
    handle.set_mixture(rows=random_mixtures(batch, 1))
    capture("per_row", patched)
    before = graphs["per_row"].out.clone()
    handle.set_mixture(rows=random_mixtures(batch, 2))     # new assignment, same graph
    graphs["per_row"].step()
    notes["per_row_graph_follows_set_mixture"] = not torch.equal(before, graphs["per_row"].out)
    handle.merge(random_mixtures(1, 3)[0])
    real_capturing = svf_layers.capturing
    svf_layers.capturing = lambda: False                  # the dense path inside the graph
    try:
        capture("merged", patched)
    finally:
        svf_layers.capturing = real_capturing

    samples = {k: [] for k in graphs}
    for rep in range(reps):
        order = list(graphs) if rep % 2 == 0 else list(reversed(graphs))
        for name in order:
            graphs[name].time_us(max(1, steps // 10))     # warm-up before each timed series
            samples[name].append(graphs[name].time_us(steps))
    us = {k: statistics.median(v) for k, v in samples.items()}
    layers, vocab = lm.config.num_hidden_layers, lm.config.vocab_size
    out = dict(batch=batch, context=context, step_us=us,
               tok_s={k: batch * 1e6 / v for k, v in us.items()},
               ratio_to_unpatched={k: us["unpatched"] / us[k] for k in ("per_row", "merged")},
               byte_limit=byte_limit(model, layers, vocab, batch, context),
               capture_errors={k: g.error for k, g in graphs.items() if g.error}, **notes)
    graphs.clear()                                        # the graphs and their buffers go
    keep.clear()
    del handle, patched
    gc.collect()            # a patched model sits in reference cycles: free it before the next
    if CUDA:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, default=None, help="default: the model's")
    ap.add_argument("--vocab", type=int, default=None, help="default: 128256 (Llama-3)")
    ap.add_argument("--batch", nargs="*", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="replays per timed series")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny dims, eager (CPU check)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    small = args.small or not CUDA
    model = args.model or ("cpu-small" if small else "llama3-8b")
    layers = args.layers or (1 if small else MODELS[model]["layers"])
    vocab = args.vocab or (256 if small else 128256)
    batches = args.batch or ([1, 4] if small else [1, 8, 32, 64])
    context = args.context or (16 if small else 512)
    steps = args.steps or (3 if small else 20)
    dtype = torch.bfloat16 if CUDA else torch.float32
    lm = build_model(model, layers, dtype, vocab)
    result = dict(device=torch.cuda.get_device_name() if CUDA else "cpu",
                  date=dt.date.today().isoformat(), torch=torch.__version__, model=model,
                  layers=layers, vocab=vocab, tied_layers=True,
                  dtype=str(dtype).replace("torch.", ""), cuda_graphs=CUDA, reps=args.reps,
                  steps=steps, config_table=table_note(), runs=[])
    svd_memo = {}                                   # one SVD per matrix, for every batch
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{device_tag(result['device'])}-{result['date']}" + ("-small" if small else "")
    path = args.out / f"{stem}.json"
    with tempfile.TemporaryDirectory() as cache_dir:
        for b in batches:
            run = run_batch(lm, model, b, context, steps, args.reps, cache_dir, svd_memo)
            result["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("batch", "step_us", "ratio_to_unpatched",
                                                  "byte_limit")}), flush=True)
            # after every batch: a run cut off by its time limit keeps what it measured
            write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
