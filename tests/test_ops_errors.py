"""Every bad input to t2fast.ops gives a ValueError/TypeError that names the problem."""
import pytest
import torch

from t2fast import ops

pytestmark = pytest.mark.interpreter

T, N, M, R, SLOTS, K = 6, 10, 8, 8, 3, 2


def _args(**over):
    a = dict(x=torch.randn(T, N), U=torch.randn(M, R), S=torch.rand(R), Vh=torch.randn(R, N),
             Z=torch.ones(SLOTS, R), idx=torch.zeros(T, dtype=torch.long))
    a.update(over)
    return a


def _call(backend="triton", **over):
    a = _args(**over)
    return ops.svf_matmul(a["x"], a["U"], a["S"], a["Vh"], a["Z"], a["idx"], backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("over, exc, pattern", [
    (dict(x=torch.randn(2, T, N)), ValueError, r"x must have 2 dimension"),
    (dict(x=torch.randn(T, N + 1)), ValueError, r"x has shape \(6, 11\).*Vh.shape\[1\] = 10"),
    (dict(S=torch.rand(R + 1)), ValueError, r"S has shape \(9,\).*rank r"),
    (dict(Vh=torch.randn(R - 1, N)), ValueError, r"Vh has shape \(7, 10\)"),
    (dict(Z=torch.ones(SLOTS, R + 2)), ValueError, r"Z has shape \(3, 10\).*rank r"),
    (dict(Z=torch.ones(R)), ValueError, r"Z must have 2 dimension"),
    (dict(idx=torch.zeros(T + 1, dtype=torch.long)), ValueError, r"idx has shape \(7,\)"),
    (dict(idx=torch.zeros(T)), TypeError, r"idx has dtype float32"),
    (dict(idx=torch.full((T,), SLOTS)), ValueError, r"idx values must lie in \[0, 3\).*max 3"),
    (dict(idx=torch.full((T,), -1)), ValueError, r"idx values.*min -1"),
    (dict(x=torch.randn(T, N).to(torch.int32)), TypeError, r"x has dtype int32"),
    (dict(U=[[1.0]]), TypeError, r"U must be a torch.Tensor"),
    (dict(Z=torch.ones(SLOTS, R, device="meta")), ValueError, r"one device.*Z is on meta"),
])
def test_svf_matmul_rejects(over, exc, pattern, backend):
    with pytest.raises(exc, match=pattern):
        _call(backend, **over)


def test_stack_group_checks_that_each_slice_belongs_together():
    """Slices whose S or Vh belong to another slice (same total rank, so the grouped op could
    not tell) or differ in dtype, input size or device are refused, naming the slice."""
    g = torch.Generator().manual_seed(0)
    Us = [torch.randn(10, 4, generator=g), torch.randn(20, 8, generator=g)]
    Ss = [torch.rand(4, generator=g), torch.rand(8, generator=g)]
    Vhs = [torch.randn(4, 12, generator=g), torch.randn(8, 12, generator=g)]
    Up, S, Vh = ops.stack_group(Us, Ss, Vhs)
    assert [U.shape for U in Up] == [(10, 4), (20, 8)] and S.shape == (12,)
    for args, exc, pattern in [
        ((Us, Ss[::-1], Vhs[::-1]), ValueError, r"Ss\[0\] has shape \(8,\).*Us\[0\]"),
        ((Us, Ss, [Vhs[0], Vhs[1][:, :5]]), ValueError, r"Vhs\[1\] has shape \(8, 5\)"),
        ((Us, Ss, [Vhs[0], Vhs[1].T]), ValueError, r"Vhs\[1\] has shape \(12, 8\)"),
        (([Us[0].bfloat16(), Us[1]], Ss, Vhs), TypeError, r"Us\[1\] is torch.float32"),
        (([Us[0], Us[1][:, 0]], Ss, Vhs), ValueError, r"Us\[1\] must have 2 dimension"),
        (([Us[0], Us[1].to("meta")], Ss, Vhs), ValueError, r"one device.*Us\[1\] is on meta"),
    ]:
        with pytest.raises(exc, match=pattern):
            ops.stack_group(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        _call("cuda")


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match=r"backend='triton'.*float64"):
        _call("triton", x=torch.randn(T, N, dtype=torch.float64))
    # the torch backend accepts float64 and returns float64
    assert _call("torch", x=torch.randn(T, N, dtype=torch.float64)).dtype == torch.float64


def test_triton_rejects_trainable_factors():
    with pytest.raises(ValueError, match=r"U requires grad"):
        _call("triton", U=torch.randn(M, R, requires_grad=True))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors, or TRITON_INTERPRET=1"):
        _call("triton")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("alpha, bank, exc, pattern", [
    (torch.ones(SLOTS, K + 1), torch.ones(K, R), ValueError, r"alpha has shape \(3, 3\).*== 2"),
    (torch.tensor([[1.0, float("nan")]] * SLOTS), torch.ones(K, R), ValueError,
     r"alpha contains 3 non-finite"),
    (torch.ones(SLOTS, K), torch.ones(K, R + 1), ValueError, r"bank has shape \(2, 9\)"),
    (torch.ones(K), torch.ones(K, R), ValueError, r"alpha must have 2 dimension"),
])
def test_svf_matmul_mix_rejects(alpha, bank, exc, pattern):
    a = _args()
    with pytest.raises(exc, match=pattern):
        ops.svf_matmul_mix(a["x"], a["U"], a["S"], a["Vh"], alpha, bank, a["idx"],
                           backend="triton")


def test_mix_experts_checks_and_values():
    alpha = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    bank = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    Z = ops.mix_experts(alpha, bank)
    torch.testing.assert_close(Z, torch.tensor([[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        ops.mix_experts(torch.tensor([[float("inf"), 0.0]]), bank)
    with pytest.raises(ValueError, match=r"alpha has shape \(1, 3\)"):
        ops.mix_experts(torch.ones(1, 3), bank)


def test_svf_merge_rejects_wrong_z():
    a = _args()
    with pytest.raises(ValueError, match=r"z has shape \(9,\)"):
        ops.svf_merge(a["U"], a["S"], torch.ones(R + 1), a["Vh"], backend="triton")
