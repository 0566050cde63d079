"""Triton SVF kernels against a float64 reference (interpreter on the CPU, compiled on CUDA).

Every case draws fresh random inputs, includes sizes that are not multiples of any block, and
compares with a float64 computation on the same (dtype-rounded) inputs.
"""
import pytest
import torch

from t2fast import ops
from t2fast.kernels import scaled_matmul, shrink_expand
from t2fast.kernels.plans import SVFPlan, TileConfig
from t2fast.ops.reference import svf_matmul_mix_reference, svf_matmul_reference

pytestmark = pytest.mark.interpreter

# Tolerances: max |y - y64| relative to max |y64|, and the relative Frobenius error
# ‖y - y64‖ / ‖y64‖. They cover the output rounding of the dtype plus fp32 accumulation; the triton
# path also rounds h once to the activation dtype (the expand's tensor-core operand), the torch
# composition rounds x Vhᵀ, the scale and their product.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TOL_FRO = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)

# (T, n, m, r, slots): decode-like, odd, S = T, r < min(m, n), wide-n
SHAPES = [
    (1, 33, 17, 17, 1),
    (37, 45, 29, 29, 5),
    (48, 40, 70, 40, 48),
    (5, 70, 50, 23, 3),
    (19, 130, 33, 33, 7),
]


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _factors(n, m, r, dtype, device, gen):
    U = _rand((m, r), dtype, device, gen) / m ** 0.5
    Vh = _rand((r, n), dtype, device, gen) / n ** 0.5
    S = torch.rand(r, generator=gen).to(device) * 3 + 0.1
    return U, S, Vh


def _f64(*ts):
    return [t.double() for t in ts]


def _close(y, ref, dtype):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "kernel left unwritten (poisoned) or non-finite outputs"
    scale = ref.abs().max().clamp_min(1e-6)
    err = (y.double() - ref).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.3e} > {TOL[dtype]:.0e} * {scale:.3e}"
    fro = (y.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    assert fro <= TOL_FRO[dtype], f"relative Frobenius error {fro:.3e} > {TOL_FRO[dtype]:.0e}"


def _idx(T, slots, gen, device, dtype=torch.int64):
    """Random slots with repeats; slot 0 never used when slots > 2 (unused rows must not matter)."""
    lo = 1 if slots > 2 else 0
    return torch.randint(lo, slots, (T,), generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_svf_matmul_matches_float64(shape, dtype, device):
    T, n, m, r, slots = shape
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = _rand((T, n), dtype, device, gen)
    U, S, Vh = _factors(n, m, r, dtype, device, gen)
    Z = (1 + 0.5 * torch.randn(slots, r, generator=gen)).to(device)
    idx = _idx(T, slots, gen, device)
    y = ops.svf_matmul(x, U, S, Vh, Z, idx, backend="triton")
    ref = svf_matmul_reference(*_f64(x, U, S, Vh, Z), idx)
    _close(y, ref, dtype)
    # the torch backend agrees with the same oracle
    _close(ops.svf_matmul(x, U, S, Vh, Z, idx, backend="torch"), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svf_matmul_mix_matches_float64(dtype, device):
    T, n, m, r, slots, K = 23, 50, 37, 37, 6, 4
    gen = torch.Generator().manual_seed(7)
    x = _rand((T, n), dtype, device, gen)
    U, S, Vh = _factors(n, m, r, dtype, device, gen)
    alpha = torch.randn(slots, K, generator=gen).to(device)
    bank = (1 + 0.3 * torch.randn(K, r, generator=gen)).to(device)
    idx = _idx(T, slots, gen, device, torch.int32)
    y = ops.svf_matmul_mix(x, U, S, Vh, alpha, bank, idx, backend="triton")
    ref = svf_matmul_mix_reference(*_f64(x, U, S, Vh, alpha, bank), idx)
    _close(y, ref, dtype)
    # mixing in the kernel equals mixing first, then gathering
    y_table = ops.svf_matmul(x, U, S, Vh, ops.mix_experts(alpha, bank), idx, backend="triton")
    _close(y_table, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mn_r", [(29, 45, 29), (64, 33, 20)], ids=str)
def test_svf_merge_matches_float64(mn_r, dtype, device):
    m, n, r = mn_r
    gen = torch.Generator().manual_seed(3)
    U, S, Vh = _factors(n, m, r, dtype, device, gen)
    z = (1 + 0.5 * torch.randn(r, generator=gen)).to(device)
    W = ops.svf_merge(U, S, z, Vh, backend="triton")
    ref = (U.double() * (S.double() * z.double())) @ Vh.double()
    assert W.shape == (m, n)
    _close(W, ref, dtype)


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(11)
    T, n, m, r, slots = 21, 38, 26, 26, 4
    x = _rand((n * 2, T), torch.float32, device, gen).t()[:, ::2]    # strided both ways
    U = _rand((r, m), torch.float32, device, gen).t()                 # column-major
    Vh = _rand((n, r), torch.float32, device, gen).t()
    S = torch.rand(r, generator=gen).to(device) + 0.5
    Z = _rand((r, slots), torch.float32, device, gen).t()
    idx = torch.randint(0, slots, (2 * T,), generator=gen).to(device)[::2]
    assert not (x.is_contiguous() or U.is_contiguous() or Z.is_contiguous()
                or idx.is_contiguous())
    y = ops.svf_matmul(x, U, S, Vh, Z, idx, backend="triton")
    _close(y, svf_matmul_reference(*_f64(x, U, S, Vh, Z), idx), torch.float32)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_shrink_poisoned_output_and_split(split, device):
    """Every h entry is written (split 1 overwrites NaNs) and split-K sums equal one pass."""
    gen = torch.Generator().manual_seed(5)
    T, n, r, slots = 17, 77, 19, 3
    x = _rand((T, n), torch.float32, device, gen)
    Vh = _rand((r, n), torch.float32, device, gen)
    S = torch.rand(r, generator=gen).to(device) + 0.5
    Z = _rand((slots, r), torch.float32, device, gen)
    idx = torch.randint(0, slots, (T,), generator=gen).to(device)
    out = torch.full((T, r), float("nan"), device=device) if split == 1 else \
        torch.zeros((T, r), device=device)
    h = shrink_expand.launch_shrink(x, Vh, S, idx, Z=Z,
                                    tile=TileConfig(16, 32, 16, split_k=split), out=out)
    assert h is out
    ref = (x.double() @ Vh.double().T) * S.double() * Z.double()[idx]
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)


def test_expand_poisoned_output_strided(device):
    gen = torch.Generator().manual_seed(6)
    P, R, Q = 19, 37, 45
    A = _rand((P, R), torch.float32, device, gen)
    B = _rand((R, Q), torch.float32, device, gen)
    big = torch.full((P, 2 * Q), float("nan"), device=device)
    out = big[:, ::2]
    scaled_matmul.launch_scaled_matmul(A, B, out=out)
    torch.testing.assert_close(out.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-5)
    assert big[:, 1::2].isnan().all(), "kernel wrote outside its output view"


def test_empty_batch(device):
    gen = torch.Generator().manual_seed(0)
    U, S, Vh = _factors(8, 6, 6, torch.float32, device, gen)
    y = ops.svf_matmul(torch.empty(0, 8, device=device), U, S, Vh, torch.ones(1, 6, device=device),
                       torch.empty(0, dtype=torch.long, device=device), backend="triton")
    assert y.shape == (0, 6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_keeps_the_autograd_graph(device, backend):
    """An empty micro-batch in training backpropagates (zero gradients), as x[:0] @ W does."""
    gen = torch.Generator().manual_seed(0)
    U, S, Vh = _factors(8, 6, 6, torch.float32, device, gen)
    x = torch.empty(0, 8, device=device, requires_grad=True)
    Z = torch.ones(1, 6, device=device, requires_grad=True)
    y = ops.svf_matmul(x, U, S, Vh, Z, torch.empty(0, dtype=torch.long, device=device),
                       backend=backend)
    assert y.shape == (0, 6) and y.requires_grad
    y.sum().backward()
    assert torch.equal(Z.grad, torch.zeros_like(Z)) and x.grad.shape == (0, 8)


@pytest.mark.parametrize("mix", [False, True])
def test_triton_autograd_matches_reference(mix, device):
    """Gradients of x and of Z (or α and the bank) through the triton backend."""
    gen = torch.Generator().manual_seed(9)
    T, n, m, r, slots, K = 13, 24, 18, 18, 4, 3
    U, S, Vh = _factors(n, m, r, torch.float32, device, gen)
    x = _rand((T, n), torch.float32, device, gen)
    idx = torch.randint(0, slots, (T,), generator=gen).to(device)
    w = _rand((T, m), torch.float32, device, gen)
    if mix:
        params = [torch.randn(slots, K, generator=gen).to(device),
                  torch.randn(K, r, generator=gen).to(device)]
    else:
        params = [torch.randn(slots, r, generator=gen).to(device)]
    grads = {}
    for backend in ("triton", "torch"):
        xs = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params]
        if mix:
            y = ops.svf_matmul_mix(xs, U, S, Vh, ps[0], ps[1], idx, backend=backend)
        else:
            y = ops.svf_matmul(xs, U, S, Vh, ps[0], idx, backend=backend)
        (y * w).sum().backward()
        grads[backend] = [xs.grad] + [p.grad for p in ps]
    for g_tr, g_ref in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(g_tr, g_ref, rtol=1e-4, atol=1e-4)


# Plans as the GPU runs them, with interpreter-sized blocks: decode (split shrink, fp32 h),
# prefill (unsplit, h in x's dtype), split shrink with long k-blocks, and the deterministic
# family's shape (64-row tiles, narrow N, no split).
PLANS = {
    "decode-split": SVFPlan(TileConfig(16, 16, 16, split_k=4), TileConfig(16, 16, 16)),
    "prefill": SVFPlan(TileConfig(32, 32, 16, group_m=2), TileConfig(32, 16, 32, group_m=2)),
    "split-shrink": SVFPlan(TileConfig(16, 32, 16, split_k=8), TileConfig(16, 32, 32)),
    "narrow-64": SVFPlan(TileConfig(64, 16, 64), TileConfig(64, 16, 64)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", list(PLANS), ids=str)
@pytest.mark.parametrize("mix", [False, True], ids=["table", "mix"])
def test_launch_plans_match_float64(plan, mix, dtype, device):
    """Every plan shape (splits, h dtype, grouped tiles) on odd sizes against float64."""
    gen = torch.Generator().manual_seed(hash((plan, mix, str(dtype))) % 2**31)
    T, n, m, r, slots, K = 41, 83, 57, 45, 5, 3
    x = _rand((T, n), dtype, device, gen)
    U, S, Vh = _factors(n, m, r, dtype, device, gen)
    idx = _idx(T, slots, gen, device)
    alpha = torch.randn(slots, K, generator=gen).to(device)
    bank = (1 + 0.3 * torch.randn(K, r, generator=gen)).to(device)
    Z = alpha @ bank
    p = PLANS[plan]
    assert p.h_dtype(dtype) == (torch.float32 if p.shrink.split_k > 1 else dtype)
    if mix:
        y = shrink_expand.launch_group(x, [U], S, Vh, idx, alpha=alpha, bank=bank, plan=p)
    else:
        y = shrink_expand.launch_group(x, [U], S, Vh, idx, Z=Z, plan=p)
    _close(y, svf_matmul_reference(*_f64(x, U, S, Vh, Z), idx), dtype)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_expand_split_poisoned_output(split, device):
    """Split-K expand: every output written once from the slabs, nothing outside the view."""
    gen = torch.Generator().manual_seed(8)
    M, K, N = 23, 70, 37
    A = _rand((M, K), torch.float32, device, gen)
    B = _rand((N, K), torch.bfloat16, device, gen).t()         # Uᵀ-like strides
    big = torch.full((M, 2 * N), float("nan"), device=device, dtype=torch.bfloat16)
    out = big[:, ::2]
    scaled_matmul.launch_scaled_matmul(A, B, tile=TileConfig(16, 16, 16, split_k=split), out=out)
    ref = A.double() @ B.double()
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert big[:, 1::2].isnan().all(), "kernel wrote outside its output view"


def _shipped_entries():
    from t2fast.kernels import plans
    if not torch.cuda.is_available():
        return []
    arch, _ = plans.device_arch(torch.device("cuda"))
    return list(plans.load_table(arch)) or list(plans.load_table("sm90"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes run compiled on a GPU")
@pytest.mark.parametrize("entry", _shipped_entries(),
                         ids=lambda e: f"{e.m}x{e.n}-T{e.t}")
def test_every_shipped_config_on_real_shapes(entry):
    """Each shipped table entry's plan (as the GPU resolves it, with and without the default
    deterministic plans) at its own shape and bucket."""
    from t2fast.kernels import plans
    gen = torch.Generator().manual_seed(entry.m + entry.n + entry.t)
    T, n, m, r = entry.t - 3 if entry.t > 16 else 1, entry.n, entry.m, min(entry.m, entry.n)
    device = torch.device("cuda")
    x = _rand((T, n), torch.bfloat16, device, gen)
    U, S, Vh = _factors(n, m, r, torch.bfloat16, device, gen)
    slots = min(T, 16)
    Z = (1 + 0.5 * torch.randn(slots, r, generator=gen)).to(device)
    idx = _idx(T, slots, gen, device)
    for deterministic in (True, False):       # the default plan, and the entry's own
        plan = plans.plan(T, m, n, r, torch.bfloat16, device, deterministic)
        y = shrink_expand.launch_group(x, [U], S, Vh, idx, Z=Z, plan=plan)
        _close(y, svf_matmul_reference(*_f64(x, U, S, Vh, Z), idx), torch.bfloat16)
