"""Ahead-of-time compilation of the SVF kernels for a GPU target, on any machine (no GPU needed).

``compile_shrink``, ``compile_expand`` (the grouped expand, any number of slices: one binary)
and ``compile_merge`` (the scaled matmul of the merge) build a kernel config with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and the specializations a
real launch gets (16-byte-aligned pointers, unit strides as constants, 16-divisible sizes),
down to the cubin; registers and spills come from the ``ptxas -v`` log of that compile, so they
are those of the ptxas and the flags the installed Triton uses for sm_90 (they differ between
Triton versions: 3.6 runs CUDA 12.8's ``ptxas``, 3.9 CUDA 13's ``ptxas-blackwell``). The CPU
test gates (tensor-core instructions in the PTX, no spills, shared memory within the SM's
limit) use it through :func:`compile_reports`, which runs the compiler in a child
process when this one has Triton's interpreter on (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .plans import TileConfig
from .launch import compile_options, dot_fp32
from .scaled_matmul import scaled_matmul_kernel
from .shrink_expand import svf_expand_kernel, svf_shrink_kernel

SM90_TARGET = GPUTarget("cuda", 90, 32)
# Shared memory one CTA may use on sm_90 (227 KB).
SM90_MAX_SHARED = 227 * 1024
_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CompiledKernel:
    """What the compiler reports for one kernel binary."""
    name: str
    ptx: str
    shared: int
    registers: int | None
    spill_bytes: int | None

    @property
    def tensor_cores(self) -> bool:
        """``mma.sync`` or ``wgmma`` in the PTX."""
        return bool(re.search(r"\b(wgmma\.mma_async|mma\.sync)", self.ptx))

    @property
    def atomics(self) -> bool:
        return bool(re.search(r"\b(red|atom)\.global\.", self.ptx))

    def report(self) -> dict:
        """What the gates check, without the PTX text."""
        return dict(name=self.name, shared=self.shared, registers=self.registers,
                    spill_bytes=self.spill_bytes, tensor_cores=self.tensor_cores,
                    wgmma="wgmma.mma_async" in self.ptx, cp_async="cp.async" in self.ptx,
                    atomics=self.atomics, tf32=bool(re.search(r"\.tf32", self.ptx)),
                    fma=bool(re.search(r"\bfma\.rn\.f32\b", self.ptx)),
                    target=re.search(r"\.target\s+(\S+)", self.ptx).group(1))


def _signature(kernel, pointers: dict, constants: dict, divisible: set):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas() -> tuple[str, str] | None:
    """(path, CUDA release) of the ptxas this Triton runs for sm_90 (Triton 3.6 its ``ptxas``,
    3.9 its ``ptxas-blackwell``), or None when it ships none."""
    from triton.backends.nvidia.compiler import get_ptxas  # the one Triton-internal name used
    try:
        tool = get_ptxas(SM90_TARGET.arch)
    except RuntimeError:
        return None
    return tool.path, tool.version


@contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _compile(kernel, sig, attrs, constants, tile: TileConfig, target: GPUTarget):
    """Compile through Triton down to the cubin, bypassing its cache, and read registers and
    spills from the ``ptxas -v`` log of that very compile (Triton's ptxas, Triton's flags)."""
    src = ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
    log = io.StringIO()
    with _env(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), redirect_stdout(log):
        c = triton.compile(src, target=target, options=compile_options(tile))
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return CompiledKernel(kernel.__name__, c.asm["ptx"], int(c.metadata.shared),
                          int(regs.group(1)) if regs else None, sum(spills) if regs else None)


def compile_shrink(tile: TileConfig, dtype: str = "bf16", mix: bool = False, h_dtype: str = "",
                   offset_64: bool = False, target: GPUTarget = SM90_TARGET) -> CompiledKernel:
    """The shrink kernel of ``tile`` for inputs of ``dtype`` ("bf16", "fp16", "fp32")."""
    h_dtype = "fp32" if tile.split_k > 1 or dtype == "fp32" else (h_dtype or dtype)
    pointers = dict(x_ptr=_PTR[dtype], vh_ptr=_PTR[dtype], s_ptr="*fp32", z_ptr="*fp32",
                    alpha_ptr="*fp32", bank_ptr="*fp32", idx_ptr="*i32", h_ptr=_PTR[h_dtype])
    constants = dict(MIX=mix, DOT_FP32=dot_fp32(_TORCH[dtype]), OFFSET_64=offset_64,
                     stride_xn=1, stride_vn=1, stride_hr=1, **tile.meta())
    constants.update(dict(stride_ak=1, stride_br=1, stride_zs=0, stride_zr=0) if mix else
                     dict(stride_zr=1, stride_as=0, stride_ak=0, stride_bk=0, stride_br=0))
    sig, attrs = _signature(svf_shrink_kernel, pointers, constants,
                            {"N", "R", "stride_xt", "stride_vr", "stride_zs", "stride_ht",
                             "stride_as", "stride_bk"})
    return _compile(svf_shrink_kernel, sig, attrs, constants, tile, target)


def compile_expand(tile: TileConfig, dtype: str = "bf16", h_dtype: str = "",
                   offset_64: bool = False, target: GPUTarget = SM90_TARGET) -> CompiledKernel:
    """The grouped expand (``h @ U_iᵀ`` per slice) of ``tile``; h is fp32 when the shrink split,
    else x's dtype. Slice sizes, offsets and row strides divisible by 16, as a layer's packed
    factors are."""
    h_dtype = h_dtype or dtype
    pointers = dict(h_ptr=_PTR[h_dtype], u_ptr=_PTR[dtype], out_ptr=_PTR[dtype])
    constants = dict(DOT_FP32=dot_fp32(_TORCH[dtype]), OFFSET_64=offset_64,
                     stride_hr=1, stride_om=1, **tile.meta(split=False))
    sig, attrs = _signature(svf_expand_kernel, pointers, constants,
                            {"stride_ht", "stride_ot", "U0", "U1", "U2", "M0", "M1", "M2", "R0",
                             "R1", "R2", "stride_u0", "stride_u1", "stride_u2"})
    return _compile(svf_expand_kernel, sig, attrs, constants, tile, target)


def compile_merge(tile: TileConfig, dtype: str = "bf16", target: GPUTarget = SM90_TARGET
                  ) -> CompiledKernel:
    """The merge ``U diag(σ⊙z) Vh`` (scaled matmul with an fp32 scale) of ``tile``."""
    out = "fp32" if tile.split_k > 1 else dtype
    pointers = dict(a_ptr=_PTR[dtype], scale_ptr="*fp32", b_ptr=_PTR[dtype], out_ptr=_PTR[out])
    constants = dict(HAS_SCALE=True, DOT_FP32=dot_fp32(_TORCH[dtype]), OFFSET_64=False,
                     stride_ak=1, stride_bn=1, stride_on=1, **tile.meta())
    sig, attrs = _signature(scaled_matmul_kernel, pointers, constants,
                            {"M", "N", "K", "stride_am", "stride_bk", "stride_os", "stride_om"})
    return _compile(scaled_matmul_kernel, sig, attrs, constants, tile, target)


def _compile_spec(spec: dict) -> dict:
    tile = TileConfig(**spec["tile"])
    wide = spec.get("offset_64", False)
    if spec["op"] == "shrink":
        k = compile_shrink(tile, spec["dtype"], spec.get("mix", False), offset_64=wide)
    elif spec["op"] == "expand":
        k = compile_expand(tile, spec["dtype"], spec.get("h_dtype", ""), offset_64=wide)
    else:
        k = compile_merge(tile, spec["dtype"])
    return k.report()


def compile_reports(specs: list[dict]) -> list[dict]:
    """Compile each ``{"op": "shrink"|"expand"|"merge", "tile": {...}, "dtype": "bf16",
    "mix": bool, "h_dtype": "fp32", "offset_64": bool}`` for sm_90 and return
    :meth:`CompiledKernel.report` dicts.

    Runs in a child process with ``TRITON_INTERPRET=0`` when the interpreter is on here.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return [_compile_spec(s) for s in specs]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "t2fast.kernels.aot"], input=json.dumps(specs),
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps([_compile_spec(s) for s in json.loads(sys.stdin.read())]))
