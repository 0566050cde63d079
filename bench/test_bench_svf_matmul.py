"""pytest-benchmark comparisons of the SVF paths: ``make bench`` (saves a JSON run),
``make bench-compare`` (reruns and compares against the last saved run).

One benchmark group per (matrix shape, T), each holding the same five implementations on the
same problem (S = min(T, 16) distinct mixtures), so the ratio column of a group compares like
with like:

    dense        x @ Wᵀ, the base layer (the floor for any SVF path)
    composition  the torch composition ``((x @ Vhᵀ) * (S ⊙ Z[idx])) @ Uᵀ``
    materialize  W' = U diag(σ ⊙ z_s) Vh built for each distinct mixture s and applied to its
                 tokens: what per-request mixtures cost without the factored kernels
    triton       t2fast's kernels with a per-slot z table
    triton-mix   t2fast's kernels mixing z from α and an expert bank inside the kernel

On CUDA: the Llama-3-8B matrix shapes in bf16 at T = 1, 16, 64 and 4096, kernels compiled.
On the CPU: the scaled-down ``cpu-small`` shapes in float32 at T = 1 and 16, the kernels
through Triton's interpreter (a few rounds each): the CPU table checks that the comparison runs
and says nothing about GPU speed.
"""
import pytest
import torch

import baselines as B
from shapes import projections

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODEL = "llama3-8b" if CUDA else "cpu-small"
#: Distinct matrix shapes of a Llama layer (v has k's shape, o q's, up gate's).
MATRICES = {name: projections(MODEL)[name] for name in ("q", "k", "gate", "down")}
TOKENS = (1, 16, 64, 4096) if CUDA else (1, 16)
CASES = [(mat, T) for mat in MATRICES for T in TOKENS]
IMPLS = {"dense": B.dense, "composition": B.torch_composition,
         "materialize": B.materialize_per_mixture, "triton": B.svf_triton,
         "triton-mix": B.svf_triton_mix}
#: Rounds of an interpreted kernel call on the CPU (each takes 0.05-1.5 s).
INTERPRETER_ROUNDS = 3


def group_name(mat: str, T: int) -> str:
    """The benchmark group of a case: model, matrix, its shape (m x n) and T."""
    m, n = MATRICES[mat]
    return f"{MODEL} {mat} {m}x{n} T={T}"


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{MODEL}-{c[0]}-T{c[1]}")
def case(request):
    mat, T = request.param
    m, n = MATRICES[mat]
    problem = B.make_problem(m, n, T, slots=min(T, 16), dtype=DTYPE, device=DEVICE)
    return group_name(mat, T), problem, B.reference_fp32(problem).float()


def _timed(benchmark, impl: str, fn, problem):
    if CUDA:
        def call():
            out = fn(problem)
            torch.cuda.synchronize()
            return out
        fn(problem)                               # compile before timing
        torch.cuda.synchronize()
        return benchmark(call)
    if impl.startswith("triton"):                 # the interpreter: a few rounds, not seconds
        return benchmark.pedantic(fn, args=(problem,), rounds=INTERPRETER_ROUNDS,
                                  warmup_rounds=1)
    return benchmark(fn, problem)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_svf(benchmark, case, impl):
    group, problem, ref = case
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=DEVICE, dtype=str(DTYPE).removeprefix("torch."),
                                T=problem.x.shape[0], m=problem.U.shape[0],
                                n=problem.Vh.shape[1], slots=problem.Z.shape[0])
    y = _timed(benchmark, impl, IMPLS[impl], problem).float()
    if impl != "dense":   # every SVF path computes the same thing (dense is the base layer)
        assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()
