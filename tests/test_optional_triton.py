"""Without Triton (macOS, Windows, any machine without its wheel) t2fast imports, patches a model
and serves experts through the torch backend; asking for the triton backend is a clear error."""
import os
import subprocess
import sys
import textwrap


# Every module is importable without Triton except the kernels, their custom ops (imported by
# t2fast.triton_import.register_custom_ops when the triton backend first runs) and the vLLM /
# serving layers (vLLM itself needs Triton).
NEEDS_TRITON = ("t2fast.kernels", "t2fast.ops.custom_ops", "t2fast.vllm", "t2fast.serve")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, os, pathlib, sys

    class HideTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideTriton())
    import torch
    import t2fast
    from t2fast.models import load_tiny, tiny_expert

    root = pathlib.Path(t2fast.__file__).parent
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("t2fast", *path.relative_to(root).with_suffix("").parts))
        if not name.startswith(tuple(sys.argv[1].split(","))) and path.stem != "__main__":
            importlib.import_module(name.removesuffix(".__init__"))
    assert "triton" not in sys.modules, "a t2fast module imported triton"

    model, tok = load_tiny()
    ids = tok(["Q: 4+64=?\\nA: "], return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        handle = t2fast.patch_model(model, experts=[tiny_expert("arith")], backend="torch")
        handle.set_mixture(rows=["arith"])
        adapted = model(ids).logits
        assert torch.isfinite(adapted).all() and not torch.equal(adapted, base)
        handle.restore()
        assert torch.equal(model(ids).logits, base)

    os.environ["TRITON_INTERPRET"] = "1"        # the kernels could run here, if Triton were there
    assert t2fast.ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    try:                                        # refused by patch_model, before any work
        t2fast.patch_model(model, experts=[tiny_expert("arith")], backend="triton")
    except ImportError as exc:
        print("ImportError:", exc)
    else:
        raise AssertionError("backend='triton' was accepted without Triton")
    assert not any(isinstance(m, t2fast.layers.SVFLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert "triton" not in sys.modules
""")


def test_import_patch_and_torch_backend_without_triton(tmp_path):
    env = {**os.environ, "T2FAST_CACHE": str(tmp_path), "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(NEEDS_TRITON)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    error = res.stdout.split("ImportError: ", 1)[1]
    assert "backend='triton' needs the triton package" in error and "backend='torch'" in error

