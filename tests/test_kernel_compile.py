"""CPU gates on the GPU code: every shipped kernel config compiled for sm_90 (H100/H200).

Triton's ahead-of-time compiler needs no GPU. For each distinct binary that the deterministic
plans of every layer group (q/k/v, o, gate/up, down of Llama-3-8B and Qwen2.5-7B, every bucket)
and the order-dependent plans of the shipped table produce (bf16; plus fp16, the α-mixing
shrink, 64-bit offsets and the merge), the PTX must use tensor cores (``mma.sync`` or
``wgmma``) and asynchronous copies, ``ptxas -v`` must report no spills and at most 255
registers, and shared memory must fit one SM. The split-K shrink must add with atomics, nothing
else may. Speed itself is only measured on a GPU (bench/).
"""
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from t2fast.kernels import aot, plans

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from shapes import group_dims, groups  # noqa: E402

pytestmark = pytest.mark.skipif(aot.ptxas() is None, reason="Triton ships no ptxas here")

SMS = 132


def _specs():
    """One spec per distinct compiled kernel of the shipped plans (and fp16, α-mixing, fp32)."""
    table = plans.load_table("sm90")
    fast = [e.plan for e in table]
    fast += [plans.plan_for(plans.t_bucket(T), e.m, e.n, min(e.m, e.n), torch.bfloat16,
                              "sm90", SMS, deterministic=False)
             for e in table for T in (1, e.t)]
    det = [plans.plan_for(b, *group_dims(slices), torch.bfloat16, "sm90", SMS)
           for model in ("llama3-8b", "qwen2.5-7b") for slices in groups(model).values()
           for b in plans.T_BUCKETS]
    seen, specs = set(), []

    def add(op, tile, dtype="bf16", mix=False, h_dtype="", offset_64=False):
        if op == "expand":                    # the grouped expand never splits
            tile = plans.TileConfig(**{**asdict(tile), "split_k": 1})
        spec = dict(op=op, tile=asdict(tile), dtype=dtype, mix=mix, h_dtype=h_dtype,
                    offset_64=offset_64)
        key = repr(sorted(spec.items()))
        if key not in seen:
            seen.add(key)
            specs.append(spec)

    for plan in fast + det:
        h = "fp32" if plan.shrink.split_k > 1 else "bf16"
        add("shrink", plan.shrink)
        add("expand", plan.expand, h_dtype=h)
    for plan in det:                          # what the vLLM layers run (α mixed in the kernel)
        add("shrink", plan.shrink, mix=True)
    decode = plans.plan_for(16, 4096, 4096, 4096, torch.float16, "sm90", SMS)
    add("shrink", decode.shrink, "fp16")
    add("expand", decode.expand, "fp16")
    prefill = plans.plan_for(4096, 28672, 4096, 8192, torch.bfloat16, "sm90", SMS)
    add("shrink", prefill.shrink, offset_64=True)
    add("expand", prefill.expand, offset_64=True)
    add("merge", plans.gemm_tile(4096, torch.bfloat16))
    return specs


SPECS = _specs()


@pytest.fixture(scope="module")
def reports():
    fp32 = plans.plan_for(16, 256, 256, 256, torch.float32, "sm90", SMS).shrink
    return aot.compile_reports(SPECS + [dict(op="shrink", tile=asdict(fp32), dtype="fp32")])


def _label(i):
    s = SPECS[i]
    t = s["tile"]
    h = f"-h{s['h_dtype']}" if s["h_dtype"] not in ("", s["dtype"]) else ""
    return (f"{s['op']}-{s['dtype']}{h}{'-mix' if s['mix'] else ''}"
            f"{'-i64' if s['offset_64'] else ''}"
            f"-m{t['block_m']}n{t['block_n']}k{t['block_k']}s{t['split_k']}w{t['num_warps']}"
            f"p{t['num_stages']}")


@pytest.mark.parametrize("i", range(len(SPECS)), ids=_label)
def test_shipped_config_compiles_for_sm90(i, reports):
    spec, k = SPECS[i], reports[i]
    tile = spec["tile"]
    assert k["target"].startswith("sm_90")
    assert k["tensor_cores"], "no mma.sync / wgmma in the PTX"
    if tile["block_m"] >= 64 and tile["num_warps"] % 4 == 0:
        assert k["wgmma"], "a 64-row tile with 4+ warps should use wgmma"
    assert k["cp_async"], "loads are not pipelined (no cp.async)"
    assert k["spill_bytes"] == 0, f"{k['spill_bytes']} bytes spilled"
    assert k["registers"] is not None and k["registers"] <= 255
    assert 0 < k["shared"] <= aot.SM90_MAX_SHARED, f"{k['shared']} bytes of shared memory"
    assert k["atomics"] == (spec["op"] == "shrink" and tile["split_k"] > 1), \
        "atomics exactly where the shrink splits its reduction"


def test_fp32_path_uses_ieee_not_tf32(reports):
    """fp32 inputs compile to exact fp32 FMAs: no tf32 tensor-core instruction, no spills."""
    k = reports[-1]
    assert not k["tf32"]
    assert k["spill_bytes"] == 0


def test_op_path_has_no_host_sync():
    """The op path never waits for the GPU (capturable in CUDA graphs)."""
    for name in ("launch.py", "shrink_expand.py", "scaled_matmul.py", "plans.py"):
        src = (Path(aot.__file__).parent / name).read_text()
        for pattern in (r"\.item\(", r"\.tolist\(", r"synchronize\(", r"\.cpu\(", r"\bprint\("):
            assert not re.search(pattern, src), f"{name} contains {pattern}"


def test_fp_fusion_is_pinned_whatever_the_environment(monkeypatch):
    """The kernels ask for FMA fusion explicitly (Triton 3.10 turns its default off): the
    α-mixing shrink compiles to fused multiply-adds even with TRITON_DEFAULT_FP_FUSION=0."""
    from t2fast.kernels.launch import FP_FUSION, compile_options

    tile = plans.TileConfig(block_m=16, block_n=16, block_k=128, num_warps=4, num_stages=2)
    assert compile_options(tile)["enable_fp_fusion"] is FP_FUSION is True
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    spec = dict(op="shrink", tile=asdict(tile), dtype="bf16", mix=True)
    assert aot.compile_reports([spec])[0]["fma"], "no fused multiply-add in the α-mixing shrink"
