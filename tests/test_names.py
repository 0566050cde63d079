"""Names that say one thing: the public op ``t2fast.ops.svf_matmul`` is the only thing called
``svf_matmul``. Its kernels, launchers, custom op, torch backend and reference are named for what
they are (``t2fast.kernels.shrink_expand.launch_group``, ``torch.ops.t2fast.svf_matmul_triton``,
``t2fast.ops.torch_backend.svf_group_torch``, ``t2fast.ops.reference.svf_matmul_reference``), and
no file of the package, its docs, benchmarks, scripts or tests uses a retired name."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Retired spellings (see the renames in t2fast/ops and t2fast/kernels).
STALE = {
    "the kernel module t2fast/kernels/svf_matmul.py (now shrink_expand.py)":
        r"kernels[./]svf_matmul\b|\bsvf_matmul\.py\b|\bsvf_matmul as (kernel|svf_op)\b",
    "a launcher svf_shrink / svf_expand (now launch_shrink / launch_expand)":
        r"\bsvf_(shrink|expand)\b",
    "a custom op without its _triton suffix":
        r"(torch\.ops\.t2fast\.|t2fast::)(svf_matmul|svf_matmul_mix|svf_group|svf_group_mix)\b",
    "a reference function without its _reference suffix":
        r"\breference\.(svf_matmul|svf_matmul_mix|svf_group|svf_merge|mix_experts)\b",
    "a torch-backend function without its _torch suffix":
        r"\btorch_backend\.(svf_matmul|svf_matmul_mix|svf_group)\b",
    "the launcher scaled_matmul (now launch_scaled_matmul)":
        r"\bscaled_matmul\.scaled_matmul\b|\bsm\.scaled_matmul\b",
    "install_svf_layers (now install_svf_methods)": r"\binstall_svf_layers\b",
    "the module t2fast.ops.svf (now t2fast.ops.dispatch)":
        r"\bops[./]svf\b|\bfrom \.svf import",
    "aot.H100, the sm_90 target (now aot.SM90_TARGET)": r"\baot\.H100\b|\bH100 = GPUTarget",
    "bench's unfused_torch, the fp32 reference (now reference_fp32)": r"\bunfused_torch\b",
    "the plans module t2fast.kernels.configs (now plans; configs/ is the tables' folder)":
        r"kernels\.configs\b|\bfrom \.configs import|kernels import (\w+, )*configs\b|"
        r"kernels/configs\.py\b",
    "triton_import.load_kernels (now register_custom_ops)": r"\bload_kernels\b",
    "t2fast.patch_model as a module (now t2fast.patching)":
        r"t2fast\.patch_model\.\w|\bfrom t2fast\.patch_model import|\bpatch_model\.py\b",
}


def _files() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "Makefile", ROOT / "bench" / "NOTES.md"]
    for folder, pattern in (("docs", "*.md"), ("t2fast", "*.py"), ("t2fast/kernels/configs", "*"),
                            ("bench", "*.py"), ("scripts", "*"), ("tests", "*.py")):
        found += sorted(p for p in (ROOT / folder).rglob(pattern) if p.is_file())
    return [p for p in found if p != Path(__file__).resolve()]


def test_no_stale_name_remains():
    files = _files()
    assert len(files) > 50, f"only {len(files)} files found under {ROOT}"
    hits = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, pattern in STALE.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r} ({what})")
    assert hits == []


def test_stale_patterns_catch_the_old_spellings():
    """Each pattern matches the spelling it retires (so the test above can fail)."""
    old = ["from t2fast.kernels import svf_matmul as kernel", "kernel.svf_expand(h, Us)",
           "torch.ops.t2fast.svf_group_mix(x)", "reference.svf_merge(U, S, z, Vh)",
           "torch_backend.svf_group(x)", "sm.scaled_matmul(A, B)", "install_svf_layers(model)",
           "from .svf import svf_matmul", "aot.H100.arch", "B.unfused_torch(problem)",
           "from t2fast.kernels import aot, configs", "t2fast.patch_model.SVFHandle",
           "triton_import.load_kernels()"]
    for what, pattern in STALE.items():
        assert any(re.search(pattern, s) for s in old), what
    new = ["from t2fast.kernels import shrink_expand", "svf_shrink_kernel[grid](x)",
           "torch.ops.t2fast.svf_group_mix_triton(x)", "reference.svf_merge_reference(U)",
           "torch_backend.svf_group_torch(x)", "launch_scaled_matmul(A, B)",
           "t2fast.ops.svf_matmul(x)", "from .dispatch import svf_matmul", "aot.SM90_TARGET",
           "t2fast/kernels/configs/sm90.json", "from t2fast.kernels import aot, plans",
           "t2fast.patch_model(model)", "from t2fast.patching import SVFHandle"]
    assert [s for s in new if any(re.search(p, s) for p in STALE.values())] == []


def test_custom_ops_are_registered_under_their_triton_names():
    pytest.importorskip("triton")
    from t2fast.triton_import import register_custom_ops

    register_custom_ops()
    for name in ("svf_matmul", "svf_matmul_mix", "svf_group", "svf_group_mix"):
        assert hasattr(torch.ops.t2fast, f"{name}_triton"), name
        assert not hasattr(torch.ops.t2fast, name), f"torch.ops.t2fast.{name} is registered"


def test_public_ops_keep_their_names():
    from t2fast import ops
    from t2fast.ops import reference, torch_backend

    for name in ("svf_matmul", "svf_matmul_mix", "svf_group", "svf_group_mix", "svf_merge",
                 "mix_experts", "stack_group"):
        assert callable(getattr(ops, name)), name
    retired = ("svf_matmul", "svf_matmul_mix", "svf_group", "svf_merge", "mix_experts")
    assert [n for n in retired if hasattr(reference, n) or hasattr(torch_backend, n)] == []
    assert callable(reference.svf_matmul_reference) and callable(torch_backend.svf_group_torch)
