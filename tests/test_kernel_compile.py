"""CPU gates on the GPU code: every shipped kernel config compiled for sm_90 (H100/H200).

Triton's ahead-of-time compiler needs no GPU. For each distinct binary the shipped table and the
heuristic produce for Llama-3-8B-class shapes (bf16; plus fp16 and the α-mixing shrink), the PTX
must use tensor cores (``mma.sync`` or ``wgmma``) and asynchronous copies, ``ptxas -v`` must
report no spills and at most 255 registers, and shared memory must fit one SM. The split-K shrink
must add with atomics, nothing else may. Speed itself is only measured on a GPU (bench/).
"""
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from t2fast.kernels import aot, configs

pytestmark = pytest.mark.skipif(aot.ptxas_path() is None, reason="Triton ships no ptxas here")

SMS = 132


def _specs():
    """One spec per distinct compiled kernel of the shipped plans (and fp16, α-mixing, fp32)."""
    table = configs.load_table("sm90")
    plans = [e.plan for e in table]
    plans += [configs.plan_for(configs.t_bucket(T), e.m, e.n, min(e.m, e.n), torch.bfloat16,
                               "sm90", SMS) for e in table for T in (1, e.t)]
    seen, specs = set(), []

    def add(op, tile, dtype="bf16", mix=False, h_dtype=""):
        spec = dict(op=op, tile=asdict(tile), dtype=dtype, mix=mix, h_dtype=h_dtype)
        key = repr(sorted(spec.items()))
        if key not in seen:
            seen.add(key)
            specs.append(spec)

    for plan in plans:
        h = "fp32" if plan.shrink.split_k > 1 else "bf16"
        add("shrink", plan.shrink)
        add("expand", plan.expand, h_dtype=h)
    decode = configs.plan_for(16, 4096, 4096, 4096, torch.float16, "sm90", SMS)
    add("shrink", decode.shrink, "fp16")
    add("expand", decode.expand, "fp16", h_dtype="fp32")
    add("shrink", decode.shrink, mix=True)
    return specs


SPECS = _specs()


@pytest.fixture(scope="module")
def reports():
    fp32 = configs.plan_for(16, 256, 256, 256, torch.float32, "sm90", SMS).shrink
    return aot.compile_reports(SPECS + [dict(op="shrink", tile=asdict(fp32), dtype="fp32")])


def _label(i):
    s = SPECS[i]
    t = s["tile"]
    return (f"{s['op']}-{s['dtype']}{'-mix' if s['mix'] else ''}-m{t['block_m']}n{t['block_n']}"
            f"k{t['block_k']}s{t['split_k']}w{t['num_warps']}p{t['num_stages']}")


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
    for name in ("launch.py", "svf_matmul.py", "scaled_matmul.py", "configs.py"):
        src = (Path(aot.__file__).parent / name).read_text()
        for pattern in (r"\.item\(", r"\.tolist\(", r"synchronize\(", r"\.cpu\(", r"\bprint\("):
            assert not re.search(pattern, src), f"{name} contains {pattern}"
