"""pytest-benchmark comparisons of the SVF paths (``pytest bench/ --benchmark-only``).

On a GPU: Llama-3-8B matrices in bf16, decode (T = 16) and prefill (T = 4096), S = T mixtures.
On the CPU: the scaled-down ``cpu-small`` dims in float32; the triton backend runs only at decode
size there (through the interpreter, so its CPU time says nothing about GPU speed).
"""
import pytest
import torch

import baselines as B
from shapes import projections

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
MATRICES = projections("llama3-8b" if CUDA else "cpu-small")
CASES = [(mat, T) for mat in ("q", "k", "down") for T in ((16, 4096) if CUDA else (16, 256))]


def _run(benchmark, fn, *args):
    if CUDA:
        torch.cuda.synchronize()

        def call():
            out = fn(*args)
            torch.cuda.synchronize()
            return out
        return benchmark(call)
    return benchmark(fn, *args)


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-T{c[1]}")
def problem(request):
    mat, T = request.param
    m, n = MATRICES[mat]
    return B.make_problem(m, n, T, slots=min(T, 16 if T > 64 else T), dtype=DTYPE, device=DEVICE)


@pytest.mark.benchmark(group="svf")
@pytest.mark.parametrize("impl", ["dense", "torch_composition", "unfused_torch",
                                  "materialize_per_mixture",
                                  "svf_triton", "svf_triton_mix"])
def test_svf_paths(benchmark, problem, impl):
    T = problem.x.shape[0]
    if impl.startswith("svf_triton") and not CUDA and T > 16:
        pytest.skip("interpreter runs the kernels only at decode size on the CPU")
    fn = getattr(B, impl)
    y = _run(benchmark, fn, problem)
    if impl != "dense":   # every SVF path computes the same thing
        ref = B.unfused_torch(problem).float()
        assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.benchmark(group="svf")
def test_merged_single_mixture(benchmark, problem):
    from t2fast import ops
    W = ops.svf_merge(problem.U, problem.S, problem.Z[0], problem.Vh, backend="torch")
    _run(benchmark, B.merged_dense, problem, W)
