"""Kernel plans: the shipped tables, nearest-key lookup, the heuristic, the tuner's table format.

Plans are plain data, so everything here runs on the CPU without launching a kernel. The decode
launch plan must fill an H100 (132 SMs): both ops of every layer group (q/k/v, o, gate/up, down)
of Llama-3-8B / Qwen2.5-7B launch at least one wave of 132 programs at T = 1 without splitting a
reduction, and a deterministic plan keeps one reduction order at every bucket.
"""
import json
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch

from t2fast.kernels import plans
from t2fast.kernels.plans import SVFPlan, TableEntry, TileConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from shapes import group_dims, groups, projections  # noqa: E402

H100_SMS = 132
SHAPES_8B = sorted({mn for model in ("llama3-8b", "mistral-7b", "qwen2.5-7b")
                    for mn in projections(model).values()})


GROUPS_8B = sorted({(name, tuple(slices)) for model in ("llama3-8b", "qwen2.5-7b")
                    for name, slices in groups(model).items()})


def _sm90_plan(T, m, n, deterministic=True, r=None):
    return plans.plan_for(plans.t_bucket(T), m, n, r or min(m, n), torch.bfloat16, "sm90",
                            H100_SMS, deterministic)


def test_shipped_tables_parse_and_cover_every_bucket():
    tables = sorted(plans.CONFIG_DIR.glob("*.json"))
    assert tables, "no config table ships with the kernels"
    for path in tables:
        data = json.loads(path.read_text())
        entries = plans.parse_table(data, str(path))
        assert data["arch"] == path.stem
        assert isinstance(data["tuned"], bool) and data["note"]
        assert {e.t for e in entries} == set(plans.T_BUCKETS), path.name
    sm90 = plans.load_table("sm90")
    assert {(e.m, e.n) for e in sm90} >= set(SHAPES_8B)


@pytest.mark.parametrize("group", GROUPS_8B, ids=lambda g: f"{g[0]}-{g[1][0][1]}")
def test_decode_plan_of_every_layer_group_fills_an_h100_without_splits(group):
    """Two launches per group at decode (no memset, no atomics, no split sum), each at least one
    wave: narrow N tiles, never a split reduction."""
    name, slices = group
    m, n, r = group_dims(slices)
    for T in (1, 8, 16, 32, 64):
        plan = _sm90_plan(T, m, n, r=r)
        counts = plan.launches(T, [mi for mi, _ in slices], r)
        assert [k for k, _ in counts] == ["shrink", "expand"], (T, plan)
        assert all(programs >= H100_SMS for _, programs in counts), (T, counts)
        assert plan.shrink.split_k == plan.expand.split_k == 1
        assert plan.backend == "triton"


@pytest.mark.parametrize("group", GROUPS_8B, ids=lambda g: f"{g[0]}-{g[1][0][1]}")
def test_deterministic_plans_keep_one_reduction_order_at_every_bucket(group):
    """Plans may change at bucket edges (tiles, stages, warps) but never a row's reduction order:
    same split (1), k-block and dot family for every T, shrink and expand alike."""
    _, slices = group
    m, n, r = group_dims(slices)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        orders = {op: set() for op in ("shrink", "expand")}
        for T in (1, 17, 33, 65, 200, 300, 600, 1100, 3000, 4096, 9000):
            p = plans.plan_for(plans.t_bucket(T) if T <= 4096 else 16384, m, n, r, dtype,
                                 "sm90", H100_SMS)
            orders["shrink"].add(plans.reduction_order(p.shrink, dtype))
            orders["expand"].add(plans.reduction_order(p.expand, dtype))
        assert all(len(o) == 1 for o in orders.values()), orders
        assert next(iter(orders["shrink"]))[0] == 1                     # no split


def test_order_dependent_plans_are_an_explicit_opt_in():
    """``deterministic=False`` gives the split-K decode shrink (memset + fp32 atomics) and the
    table's backend per bucket; the default never does."""
    fast = _sm90_plan(1, 4096, 4096, deterministic=False)
    assert fast.shrink.split_k > 1 and fast.h_dtype(torch.bfloat16) == torch.float32
    assert [k for k, _ in fast.launches(1, 4096, 4096)] == ["memset h", "shrink", "expand"]
    backends = {_sm90_plan(T, 14336, 4096, deterministic=False).backend for T in (1, 4096)}
    assert backends == {"triton", "torch"}               # the tuned table switches backends
    assert {_sm90_plan(T, 14336, 4096).backend for T in (1, 64, 4096)} == {"triton"}


def test_prefill_plan_uses_large_unsplit_tiles():
    plan = _sm90_plan(4096, 4096, 4096)
    assert plan.shrink.block_m == 128 and plan.shrink.split_k == 1
    assert plan.expand.block_m == 128 and plan.expand.split_k == 1
    assert plan.h_dtype(torch.bfloat16) == torch.bfloat16      # h stored in x's dtype
    assert _sm90_plan(1, 4096, 4096).h_dtype(torch.bfloat16) == torch.bfloat16


def test_plans_depend_on_the_bucket_only():
    """One binary per bucket: every T of a bucket gets the same plan."""
    for lo, hi in ((1, 16), (17, 32), (65, 128), (513, 1024)):
        assert _sm90_plan(lo, 4096, 14336) == _sm90_plan(hi, 4096, 14336)
    assert plans.t_bucket(1) == 16 and plans.t_bucket(17) == 32
    assert plans.t_bucket(10_000) == plans.T_BUCKETS[-1]


def test_lookup_nearest_shape_and_fallback():
    a = SVFPlan(TileConfig(16, 64, 128), TileConfig(16, 32, 128), source="a")
    b = SVFPlan(TileConfig(16, 32, 64), TileConfig(16, 16, 64), backend="torch", source="b")
    entries = [TableEntry(16, 4096, 4096, a), TableEntry(16, 1024, 4096, b),
               TableEntry(64, 4096, 4096, b)]
    assert plans.lookup(entries, 1, 4000, 4100) is a
    assert plans.lookup(entries, 1, 900, 4096) is b
    assert plans.lookup(entries, 40, 4096, 4096) is b        # bucket 64
    assert plans.lookup(entries, 5000, 4096, 4096) is b      # past the last bucket: the last
    assert plans.lookup(entries, 1, 256, 256) is None        # nothing near: heuristic
    assert plans.lookup([], 1, 4096, 4096) is None
    assert plans.lookup(entries, 1, 4000, 4100, deterministic=True) is None   # none marked
    det = TableEntry(16, 1024, 4096, b, deterministic=True)
    assert plans.lookup(entries + [det], 1, 1000, 4100, deterministic=True) is b
    assert plans.lookup(entries + [det], 1, 4000, 4100, deterministic=True) is None


def test_unknown_arch_and_fp32_use_the_heuristic():
    p = plans.plan_for(16, 4096, 4096, 4096, torch.bfloat16, "sm75", 40)
    assert p.source == "heuristic"
    p32 = plans.plan_for(16, 4096, 4096, 4096, torch.float32, "sm90", H100_SMS)
    assert p32.source == "heuristic" and p32.shrink.block_k == 32   # small IEEE-fp32 tiles


def test_fill_gpu_splits_only_what_is_too_narrow():
    wide = TileConfig(16, 32, 128)
    assert plans.fill_gpu(wide, 16, 14336, 4096, H100_SMS) == wide          # 448 tiles
    narrow = plans.fill_gpu(TileConfig(16, 64, 128), 16, 1024, 4096, H100_SMS)
    assert narrow.programs(16, 1024) >= 2 * H100_SMS
    short_k = plans.fill_gpu(TileConfig(16, 64, 128), 16, 64, 128, H100_SMS)
    assert (short_k.block_n, short_k.block_k, short_k.split_k) == (16, 32, 4)  # 4 k-blocks
    unsplit = plans.fill_gpu(TileConfig(64, 64, 128), 16, 1024, 4096, H100_SMS, split=False)
    assert (unsplit.block_n, unsplit.block_k, unsplit.split_k) == (16, 128, 1)  # N only


@pytest.mark.parametrize("bad, match", [
    (dict(block_m=8, block_n=16, block_k=16), "block_m must be a power of two >= 16"),
    (dict(block_m=16, block_n=48, block_k=16), "block_n must be a power of two"),
    (dict(block_m=16, block_n=16, block_k=16, split_k=0), "split_k must be a positive int"),
    (dict(block_m=16, block_n=16, block_k=16, num_warps=3), "num_warps must be 1, 2, 4, 8"),
])
def test_tile_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TileConfig(**bad)


def test_parse_table_names_what_is_wrong(tmp_path):
    good = plans.table_to_json([TableEntry(16, 64, 64, plans.INTERPRETER_PLAN)], "x", {})
    assert plans.parse_table(json.loads(json.dumps(good)), "t.json")[0].plan.shrink == \
        plans.INTERPRETER_PLAN.shrink
    cases = [
        ({**good, "format": 9}, "not a t2fast kernel config table of format 1"),
        ({**good, "entries": []}, "'entries' must be a non-empty list"),
        ({**good, "entries": [{**good["entries"][0], "t": 17}]}, r"entries\[0\]: t = 17"),
        ({**good, "entries": [{**good["entries"][0], "backend": "cuda"}]}, "backend must be"),
        ({**good, "entries": [{**good["entries"][0], "shrink": {"block_m": 16}}]},
         r"entries\[0\].shrink"),
        ({**good, "entries": [{**good["entries"][0],
                               "expand": {**good["entries"][0]["expand"], "bm": 1}}]},
         r"unknown tile field\(s\) \['bm'\]"),
        ({**good, "entries": [{"t": 16}]}, r"lacks \['backend', 'expand', 'm', 'n', 'shrink'\]"),
        ({**good, "entries": [{**good["entries"][0], "deterministic": True}]},
         r"a deterministic entry's shrink must keep the reduction order"),
        ({**good, "entries": [{**good["entries"][0], "deterministic": "yes"}]},
         "deterministic must be true or false"),
    ]
    for data, match in cases:
        with pytest.raises(ValueError, match=match):
            plans.parse_table(data, "t.json")


def _tuner(*argv):
    """Run bench/tune_svf.py as a CPU dry run on every machine: a visible GPU is hidden from it
    (Triton's interpreter does not time CUDA graphs)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune_svf.py"), "--num-sms", "2", *argv],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-2000:]


def test_tuner_updates_a_table_the_loader_reads(tmp_path):
    """The tuner's dry run (interpreter timing, sm_90 compile checks, tiny shapes) re-tunes one
    entry of a heuristic table in place (``--update``): the other entry keeps its plan, each
    says whether it was tuned, and the table as a whole is not marked tuned."""
    out = tmp_path / "cpu.json"
    _tuner("--untuned", "--shapes", "40x48", "64x48", "--buckets", "16", "--out", str(out))
    before = {(e.m, e.n): e for e in plans.parse_table(json.loads(out.read_text()), str(out))}
    assert not any(e.tuned for e in before.values())
    assert all(e.deterministic for e in before.values())
    _tuner("--update", "--shapes", "40x48", "--buckets", "16", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    after = {(e.m, e.n): e for e in plans.parse_table(data, str(out))}
    assert set(after) == {(40, 48), (64, 48)} and all(e.t == 16 for e in after.values())
    assert after[(40, 48)].tuned and not after[(64, 48)].tuned
    assert after[(64, 48)].plan == before[(64, 48)].plan
    assert after[(40, 48)].plan.backend == "triton" and after[(40, 48)].deterministic
    assert data["tuned"] is False and "1 of 2 entries tuned" in data["note"]


def _tune_module():
    import importlib
    return importlib.import_module("tune_svf")


class _FakeTimer:
    """Stands in for ``timing.time_alternating``: µs from ``cost(candidate)``, every race
    recorded; ``run`` calls each candidate's first callable once (to see what it launches)."""

    def __init__(self, cost, run=False):
        self.cost, self.run, self.races = cost, run, []

    def __call__(self, calls, reps):
        self.races.append(list(calls))
        if self.run:
            for fns in calls.values():
                fns[0]()
        return {k: self.cost(k) for k in calls}


def _all_clean(specs):
    return [True] * len(specs)


def _tune(timer, deterministic=True, current=None, check=_all_clean, slices=((40, 48),), T=16):
    return _tune_module().tune_entry(list(slices), T, torch.bfloat16, 2, True, deterministic,
                                     current, timer=timer, check=check, log=lambda s: None)


def test_tuner_cannot_regress_the_current_entry():
    """The current entry and the heuristic plan race the tuned pair; when the current entry is
    fastest it stays, and a tuned candidate slower than the heuristic never replaces it."""
    current = plans.heuristic_plan(16, 40, 48, 40, torch.bfloat16, 2)
    current = SVFPlan(replace(current.shrink, num_stages=3), current.expand)
    times = {"current": 1.0, "heuristic": 2.0, "tuned": 3.0}
    timer = _FakeTimer(lambda k: times.get(k, 5.0) if isinstance(k, str) else 1.0)
    entry = _tune(timer, current=current)
    assert set(timer.races[-1]) == {"tuned", "heuristic", "current"}
    assert entry.plan.shrink == current.shrink and entry.plan.backend == "triton"
    times.update(current=9.0)
    entry = _tune(_FakeTimer(lambda k: times.get(k, 5.0) if isinstance(k, str) else 1.0),
                  current=current)
    assert entry.plan.shrink == plans.heuristic_plan(16, 40, 48, 40, torch.bfloat16,
                                                       2).shrink


def test_tuned_pair_replaces_the_incumbents_only_beyond_the_noise_margin():
    """A tie keeps the current entry (then the heuristic); the tuned pair wins only when it is
    TUNED_MARGIN faster than the best incumbent."""
    tune = _tune_module()
    heuristic = plans.heuristic_plan(16, 40, 48, 40, torch.bfloat16, 2)
    current = SVFPlan(replace(heuristic.shrink, num_stages=3), heuristic.expand)

    def entry(times, current=current):
        return _tune(_FakeTimer(lambda k: times.get(k, 5.0) if isinstance(k, str) else 1.0),
                     current=current)
    assert entry({"current": 2.0, "heuristic": 2.0, "tuned": 2.0}).plan.shrink == current.shrink
    assert entry({"heuristic": 2.0, "tuned": 2.0}, None).plan.shrink == heuristic.shrink
    just = 2.0 * (1 - tune.TUNED_MARGIN) * 1.001
    assert entry({"current": 2.0, "heuristic": 3.0, "tuned": just}).plan.shrink == current.shrink
    # the tuned pair: the tiles raced first, the heuristic's here (every tile timed alike)
    won = entry({"current": 2.0, "heuristic": 3.0, "tuned": 1.0}).plan
    assert won.shrink == heuristic.shrink != current.shrink


def test_tuner_candidates_keep_the_order_and_offer_block_n_128():
    """Deterministic candidates keep the reduction order (no split, one block_k, one dot
    family); block_n 128 is offered even with --quick; the heuristic's tile is raced first."""
    tune = _tune_module()
    base = plans.heuristic_plan(4096, 4096, 4096, 4096, torch.bfloat16, H100_SMS).shrink
    tiles = tune.candidates(base, 4096, 4096, 4096, 2, H100_SMS, True, True)
    assert tiles[0] == base and any(t.block_n == 128 for t in tiles)
    assert {plans.reduction_order(t, torch.bfloat16) for t in tiles} == \
        {plans.reduction_order(base, torch.bfloat16)}
    timer = _FakeTimer(lambda k: 1.0)
    _tune(timer)
    heur = plans.heuristic_plan(16, 40, 48, 40, torch.bfloat16, 2)
    assert timer.races[0][0] == heur.shrink and timer.races[1][0] == heur.expand


def test_tuner_ties_go_to_the_composition():
    """Order-dependent entries race the torch composition, which wins ties."""
    timer = _FakeTimer(lambda k: 4.0 if isinstance(k, str) else 1.0)
    assert _tune(timer, deterministic=False).plan.backend == "torch"
    assert "torch" in timer.races[-1]
    faster = _FakeTimer(lambda k: {"torch": 4.0}.get(k, 3.9) if isinstance(k, str) else 1.0)
    assert _tune(faster, deterministic=False).plan.backend == "triton"
    det = _FakeTimer(lambda k: 1.0)
    _tune(det)
    assert "torch" not in det.races[-1]                   # deterministic plans run Triton


def test_tuner_rejects_candidates_that_spill():
    """A candidate whose sm_90 binary fails the gates is never timed, the current entry
    included."""
    def check(specs):
        return [s["tile"]["block_n"] != 128 and s["tile"]["num_stages"] != 4 for s in specs]

    current = SVFPlan(TileConfig(64, 16, 128, num_stages=4), TileConfig(64, 16, 128))
    timer = _FakeTimer(lambda k: 1.0)
    _tune(timer, current=current, check=check, slices=((256, 48),))
    timed = [k for race in timer.races[:2] for k in race]
    assert timed and all(t.block_n != 128 and t.num_stages != 4 for t in timed)
    assert "current" not in timer.races[-1]


def test_tuner_times_the_expand_on_the_real_h_dtype(monkeypatch):
    """The expand race reads h in the dtype the chosen shrink writes: bf16 for deterministic
    plans, fp32 after a split shrink."""
    from t2fast.kernels import shrink_expand
    seen = []
    real = shrink_expand.launch_expand
    monkeypatch.setattr(shrink_expand, "launch_expand",
                        lambda h, *a, **k: seen.append(h.dtype) or real(h, *a, **k))
    _tune(_FakeTimer(lambda k: 1.0, run=True))
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    split = _FakeTimer(lambda k: 0.5 if getattr(k, "split_k", 1) > 1 else 1.0, run=True)
    _tune(split, deterministic=False, slices=((40, 512),))
    assert torch.float32 in seen


def test_alternating_order_rotates_every_round():
    from timing import alternating_order
    assert alternating_order(["a", "b", "c"], 4) == list("abcbcacababc")


class _RecordLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` records ``meta``."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.name, meta))


@pytest.mark.parametrize("weights, want_fp32", [(torch.bfloat16, False), (torch.float16, False),
                                                (torch.float32, True)])
def test_launchers_pick_the_dot_from_the_weights_dtype(monkeypatch, weights, want_fp32):
    """An order-dependent decode plan splits the shrink, so ``h`` is fp32; meeting bf16/fp16 U,
    the expand must still use tensor-core dots (``DOT_FP32`` off), as the sm_90 gates compile
    it. It once took IEEE fp32 dots there, which an H100 runs on its FMA units: 2-25x slower
    than torch."""
    from t2fast.kernels import shrink_expand
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    monkeypatch.setattr(shrink_expand, "svf_shrink_kernel", _RecordLaunch("shrink", calls))
    monkeypatch.setattr(shrink_expand, "svf_expand_kernel", _RecordLaunch("expand", calls))
    plan = plans.heuristic_plan(1, 4096, 4096, 4096, weights, H100_SMS, deterministic=False)
    assert plan.shrink.split_k > 1
    m, n, r = 48, 40, 32
    x, U, Vh = torch.zeros(1, n, dtype=weights), torch.zeros(m, r, dtype=weights), \
        torch.zeros(r, n, dtype=weights)
    shrink_expand.launch_group(x, [U], torch.ones(r), Vh, torch.zeros(1, dtype=torch.int32),
                      Z=torch.ones(1, r), plan=plan)
    dots = {name: meta["DOT_FP32"] for name, meta in calls if "DOT_FP32" in meta}
    assert dots == {"shrink": want_fp32, "expand": want_fp32}
    assert [name for name, _ in calls] == ["shrink", "expand"]
