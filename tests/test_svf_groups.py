"""Grouped SVF ops, batch-invariant rows, 64-bit offsets and the one dispatch point.

Kernels run through Triton's interpreter on the CPU (compiled on CUDA, where the determinism
tests then check the real sm_90 plans on the GPU). Every oracle is a float64 computation on the
same (dtype-rounded) inputs, on sizes that are multiples of no block.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2fast import ops
from t2fast.kernels import plans, launch, shrink_expand
from t2fast.kernels.plans import SVFPlan, TileConfig
from t2fast.ops.reference import svf_group_reference, svf_matmul_reference

pytestmark = pytest.mark.interpreter
# Tests that run the Triton kernels on CPU tensors: through the interpreter only (a compiled run
# on a GPU machine covers the kernels with the device tests here).
on_cpu_kernels = pytest.mark.skipif(not launch.interpreter_active(),
                                    reason="runs the kernels on CPU tensors (interpreter)")

ROOT = Path(__file__).resolve().parents[1]
TOL_FRO = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (m_i, r_i) per slice, with n: GQA-like q/k/v, gate/up-like, one matrix
GROUPS = {
    "qkv": ([(40, 37), (12, 12), (12, 12)], 37),
    "gate_up": ([(53, 29), (53, 29)], 29),
    "single": ([(45, 30)], 61),
}
PLANS = {
    "interpreter": plans.INTERPRETER_PLAN,
    "narrow-64": SVFPlan(TileConfig(64, 16, 64), TileConfig(64, 16, 64)),
    "split-shrink": SVFPlan(TileConfig(16, 32, 16, split_k=3), TileConfig(32, 32, 16)),
}


def _group(slices, n, dtype, device, gen, slots=5, K=3):
    Us = [(torch.randn(m, r, generator=gen) / m ** 0.5).to(device, dtype) for m, r in slices]
    R = sum(r for _, r in slices)
    S = (torch.rand(R, generator=gen) * 3 + 0.1).to(device)
    Vh = (torch.randn(R, n, generator=gen) / n ** 0.5).to(device, dtype)
    alpha = torch.randn(slots, K, generator=gen).to(device)
    bank = (1 + 0.3 * torch.randn(K, R, generator=gen)).to(device)
    return Us, S, Vh, alpha, bank


def _oracle(x, Us, S, Vh, Z, idx):
    return svf_group_reference(x.double(), [U.double() for U in Us], S.double(), Vh.double(),
                               Z.double(), idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("mix", [False, True], ids=["table", "mix"])
def test_group_matches_float64(group, plan, mix, dtype, device):
    """Stacked shrink + grouped expand on odd sizes, every slice at its column offset."""
    gen = torch.Generator().manual_seed(hash((group, plan, mix, str(dtype))) % 2**31)
    slices, n = GROUPS[group]
    T = 41
    Us, S, Vh, alpha, bank = _group(slices, n, dtype, device, gen)
    x = torch.randn(T, n, generator=gen).to(device, dtype)
    idx = torch.randint(0, alpha.shape[0], (T,), generator=gen).to(device)
    Z = alpha @ bank
    kw = dict(alpha=alpha, bank=bank) if mix else dict(Z=Z)
    y = shrink_expand.launch_group(x, Us, S, Vh, idx, plan=PLANS[plan], **kw)
    ref = _oracle(x, Us, S, Vh, Z, idx)
    assert y.shape == (T, sum(m for m, _ in slices)) and y.dtype == dtype
    fro = (y.double() - ref).norm() / ref.norm()
    assert fro <= TOL_FRO[dtype], f"relative Frobenius error {fro:.2e}"


def test_grouped_expand_writes_every_output_once_and_nothing_else(device):
    """A poisoned, strided output view: every entry written, nothing outside the view."""
    gen = torch.Generator().manual_seed(3)
    slices = [(23, 19), (9, 7), (9, 7)]
    T, R = 21, 33
    h = torch.randn(T, R, generator=gen).to(device)
    Us = [torch.randn(m, r, generator=gen).to(device) for m, r in slices]
    big = torch.full((T, 2 * 41), float("nan"), device=device)
    out = big[:, ::2]
    shrink_expand.launch_expand(h, Us, tile=TileConfig(16, 16, 16), out=out)
    at, want = 0, []
    for U in Us:
        want.append(h[:, at:at + U.shape[1]].double() @ U.double().T)
        at += U.shape[1]
    torch.testing.assert_close(out.double(), torch.cat(want, 1), rtol=1e-5, atol=1e-5)
    assert big[:, 1::2].isnan().all(), "kernel wrote outside its output view"


def test_stack_group_packs_without_copies_at_call_time(device):
    """Factors stacked by ``ops.stack_group`` share one buffer, 16-element aligned; the kernel
    reads them in place, and unpacked factors give the same answer (packed per call)."""
    gen = torch.Generator().manual_seed(4)
    slices, n = GROUPS["qkv"]
    Us0, S, Vh, alpha, bank = _group(slices, n, torch.float32, device, gen)
    Us, S2, Vh2 = ops.stack_group(Us0, [S[:37], S[37:49], S[49:]],
                                  [Vh[:37], Vh[37:49], Vh[49:]])
    assert len({U.untyped_storage().data_ptr() for U in Us}) == 1
    assert all(U.storage_offset() % 16 == 0 and U.is_contiguous() for U in Us)
    assert torch.equal(S2, S) and torch.equal(Vh2, Vh)
    assert shrink_expand._slices(Us)[0] is Us                       # read in place
    x = torch.randn(9, n, generator=gen).to(device)
    idx = torch.zeros(9, dtype=torch.int32, device=device)
    a = ops.svf_group_mix(x, Us, S2, Vh2, alpha, bank, idx, backend="triton")
    b = ops.svf_group_mix(x, [U.t().contiguous().t() for U in Us0], S, Vh, alpha, bank, idx,
                          backend="triton")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ops_group_matches_per_matrix_calls(backend, device):
    """``ops.svf_group`` = the per-matrix ``ops.svf_matmul`` of each slice, concatenated."""
    gen = torch.Generator().manual_seed(5)
    slices, n = GROUPS["qkv"]
    Us, S, Vh, alpha, bank = _group(slices, n, torch.float32, device, gen)
    Z = alpha @ bank
    x = torch.randn(7, n, generator=gen).to(device)
    idx = torch.randint(0, 5, (7,), generator=gen).to(device)
    y = ops.svf_group(x, Us, S, Vh, Z, idx, backend=backend)
    parts, at = [], 0
    for U in Us:
        r = U.shape[1]
        parts.append(ops.svf_matmul(x, U, S[at:at + r], Vh[at:at + r], Z[:, at:at + r], idx,
                                    backend=backend))
        at += r
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(Us=[]), "Us must be a list of 1 to 3"),
    (dict(Us="U"), "Us must be a list of 1 to 3"),
    (dict(S=torch.ones(3)), r"S has shape \(3,\): dimension 0 must equal the group's total rank"),
    (dict(Z=torch.ones(2, 5)), "Z has shape .* the group's total rank R = 8"),
])
def test_group_errors_name_the_argument(bad, match):
    args = dict(x=torch.ones(2, 6), Us=[torch.ones(4, 5), torch.ones(3, 3)], S=torch.ones(8),
                Vh=torch.ones(8, 6), Z=torch.ones(2, 8), idx=torch.zeros(2, dtype=torch.long))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.svf_group(**args, backend="torch")


@on_cpu_kernels
@pytest.mark.parametrize("needs_grad", ["x", "Z"])
def test_grouped_triton_ops_refuse_gradients(needs_grad):
    args = dict(x=torch.ones(2, 6), Us=[torch.ones(4, 8)], S=torch.ones(8), Vh=torch.ones(8, 6),
                Z=torch.ones(1, 8), idx=torch.zeros(2, dtype=torch.long))
    args[needs_grad].requires_grad_()
    with pytest.raises(ValueError, match="serve inference only"):
        ops.svf_group(**args, backend="triton")
    with torch.no_grad():
        ops.svf_group(**args, backend="triton")


# ------------------------------------------------------------------------ batch-invariant rows

def _sm90_plan(T, m, n, r, dtype, deterministic=True):
    return plans.plan_for(plans.t_bucket(T) if T <= 4096 else 8192, m, n, r, dtype, "sm90",
                            132, deterministic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_row_is_bit_identical_whatever_its_batch(dtype, device):
    """One row (its input and slot) inside batches of 1 to 257 tokens, at different positions,
    with random other rows and slots, through the sm_90 deterministic plans of each T (which
    change tiles at bucket edges): its output is bit-identical every time."""
    gen = torch.Generator().manual_seed(6)
    slices, n = [(40, 40), (24, 24), (24, 24)], 300          # 3 ragged k-blocks of 128
    Us, S, Vh, alpha, bank = _group(slices, n, dtype, device, gen)
    m, R = sum(s[0] for s in slices), sum(s[1] for s in slices)
    x0 = torch.randn(1, n, generator=gen).to(device, dtype)
    want, seen = None, set()
    for T, pos in ((1, 0), (2, 1), (16, 15), (17, 3), (33, 32), (64, 10), (65, 64), (130, 77),
                   (257, 200)):
        x = torch.randn(T, n, generator=gen).to(device, dtype)
        x[pos] = x0[0]
        idx = torch.randint(0, alpha.shape[0], (T,), generator=gen).to(device)
        idx[pos] = 2
        plan = _sm90_plan(T, m, n, R, dtype)
        seen.add(plan)
        y = shrink_expand.launch_group(x, Us, S, Vh, idx, alpha=alpha, bank=bank, plan=plan)[pos]
        if want is None:
            want = y
        assert torch.equal(y, want), f"row changed at T = {T}"
    assert len(seen) >= 3, "the test must cross plans that differ"


@on_cpu_kernels
def test_ops_default_is_deterministic_and_opt_in_reaches_the_plan(monkeypatch):
    """``deterministic`` travels from ``t2fast.ops`` to the plan lookup; the default is True."""
    seen = []
    real = shrink_expand.group_plan

    def spy(x, Us, Vh, deterministic=True):
        seen.append(deterministic)
        return real(x, Us, Vh, deterministic)

    monkeypatch.setattr(shrink_expand, "group_plan", spy)
    x, U, S, Vh = torch.ones(2, 6), torch.ones(4, 5), torch.ones(5), torch.ones(5, 6)
    idx = torch.zeros(2, dtype=torch.long)
    ops.svf_matmul(x, U, S, Vh, torch.ones(1, 5), idx, backend="triton")
    ops.svf_group(x, [U], S, Vh, torch.ones(1, 5), idx, backend="triton", deterministic=False)
    assert seen == [True, False]


@on_cpu_kernels
def test_auto_follows_the_plans_backend_inside_the_op(monkeypatch):
    """``auto`` runs whatever the plan names (here: the composition), decided inside the custom
    op; ``triton`` always runs the kernels."""
    plan = SVFPlan(TileConfig(16, 16, 16), TileConfig(16, 16, 16), backend="torch")
    monkeypatch.setattr(shrink_expand, "group_plan", lambda *a, **k: plan)
    from t2fast.ops import torch_backend
    calls = []
    real = torch_backend.svf_group_torch
    monkeypatch.setattr(torch_backend, "svf_group_torch",
                        lambda *a: calls.append("torch") or real(*a))
    x, U, S, Vh = torch.ones(2, 6), torch.ones(4, 5), torch.ones(5), torch.ones(5, 6)
    idx = torch.zeros(2, dtype=torch.long)
    ops.svf_matmul(x, U, S, Vh, torch.ones(1, 5), idx, backend="auto")
    assert calls == ["torch"]
    ops.svf_matmul(x, U, S, Vh, torch.ones(1, 5), idx, backend="triton")
    assert calls == ["torch"]


# ---------------------------------------------------------------------------- 64-bit offsets

def test_offsets_go_64_bit_exactly_where_int32_would_wrap():
    """The launcher's decision from shapes and strides (no allocation): the Llama MLP at 150k
    tokens (T·m ≈ 2.15e9) needs int64 offsets, 4096 tokens do not; a stride-only view counts."""
    def meta(*shape):
        return torch.empty(shape, device="meta")

    assert not launch.needs_offset_64(meta(4096, 14336), meta(4096, 4096))
    assert launch.needs_offset_64(meta(150_000, 14336))
    assert launch.max_offset(meta(150_000, 14336)) == 149_999 * 14336 + 14335
    assert not launch.needs_offset_64(meta(2, 2**30).as_strided((2, 16), (2**30, 1)))
    assert launch.needs_offset_64(meta(3, 2**30).as_strided((3, 16), (2**30, 1)))


class _Spy:
    """Wraps a Triton kernel: records each launch's constexprs, then launches it."""

    def __init__(self, kernel_fn, name, calls):
        self.kernel_fn, self.name, self.calls = kernel_fn, name, calls

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append((self.name, meta))
            return self.kernel_fn[grid](*args, **meta)
        return run


def test_64_bit_offset_path_matches_float64(monkeypatch, device):
    """With the limit lowered, the launchers pick ``OFFSET_64`` and the int64 kernels still give
    the oracle's answer (shrink, grouped expand)."""
    calls = []
    monkeypatch.setattr(launch, "INT32_MAX", 100)
    monkeypatch.setattr(shrink_expand, "INT32_MAX", 100)
    monkeypatch.setattr(shrink_expand, "svf_shrink_kernel",
                        _Spy(shrink_expand.svf_shrink_kernel, "shrink", calls))
    monkeypatch.setattr(shrink_expand, "svf_expand_kernel",
                        _Spy(shrink_expand.svf_expand_kernel, "expand", calls))
    gen = torch.Generator().manual_seed(7)
    slices, n = GROUPS["qkv"]
    Us, S, Vh, alpha, bank = _group(slices, n, torch.float32, device, gen)
    x = torch.randn(19, n, generator=gen).to(device)
    idx = torch.randint(0, 5, (19,), generator=gen).to(device)
    y = shrink_expand.launch_group(x, Us, S, Vh, idx, alpha=alpha, bank=bank)
    assert [(name, meta["OFFSET_64"]) for name, meta in calls] == [("shrink", True),
                                                                   ("expand", True)]
    ref = _oracle(x, Us, S, Vh, alpha @ bank, idx)
    assert (y.double() - ref).norm() / ref.norm() <= 1e-5


# ------------------------------------------------------------------------ one dispatch point

def test_only_t2fast_ops_calls_the_custom_ops():
    """``torch.ops.t2fast.*`` appears in the package only inside ``t2fast/ops``."""
    offenders = []
    for path in (ROOT / "t2fast").rglob("*.py"):                 # t2fast/kernels included
        if "ops" in path.relative_to(ROOT).parts[:2]:
            continue
        code = "\n".join(l for l in path.read_text().splitlines()
                         if not l.lstrip().startswith(("#", "``", "*")))
        if re.search(r"torch\.ops\.t2fast\.\w+\(", code):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def _vllm_layer(parts_spec, n, backend, gen, slots=4, experts=2, **settings):
    """An SVFLinearMethod with its layer buffers, built as process_weights_after_loading does
    (without vLLM's model); ``settings``: T2Config fields."""
    from t2fast.vllm.config import T2Config
    from t2fast.vllm.layers import SVFLinearMethod, SVFPart

    from t2fast.vllm.runner import T2Runtime

    vc = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=slots - 1, max_num_batched_tokens=64),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=1)),
        device_config=SimpleNamespace(device="cpu"))
    runtime = T2Runtime(vc, T2Config(backend=backend, max_experts=experts, **settings))
    parts = [SVFPart(f"model.layers.0.p{i}", i, target) for i, (_, target) in
             enumerate(parts_spec)]
    method = SVFLinearMethod(SimpleNamespace(), runtime, "model.layers.0.x", parts, 0, False)
    layer = torch.nn.Module()
    factors = {}
    for p, ((m, _), target) in zip(parts, parts_spec):
        p.out_size = m
        if target:
            r = min(m, n)
            factors[p.index] = (torch.randn(m, r, generator=gen) / m ** 0.5,
                                torch.rand(r, generator=gen) + 0.5,
                                torch.randn(r, n, generator=gen) / n ** 0.5)
            p.rank = r
        else:
            layer.register_buffer(f"t2_W{p.index}", torch.randn(m, n, generator=gen))
    method._register_group(layer, factors)
    for i, (_, S, _) in factors.items():
        getattr(layer, f"t2_bank{i}")[1:] = 1 + 0.2 * torch.randn(experts, S.shape[0],
                                                                   generator=gen)
    layer.register_buffer("t2_token_slot", torch.randint(0, slots, (64,), generator=gen,
                                                         dtype=torch.int32))
    alpha = torch.rand(1, slots, experts + 1, generator=gen)
    layer.register_buffer("t2_alpha", alpha)
    return method, layer, factors


@on_cpu_kernels
@pytest.mark.parametrize("targets", [(True, True, True), (True, False, True)],
                         ids=["all", "partial"])
def test_vllm_layer_runs_one_group_through_t2fast_ops(monkeypatch, targets):
    """The vLLM method calls ``t2fast.ops.svf_group_mix`` once per layer (with the configured
    backend, ``auto`` included) and matches the per-matrix float64 oracle, dense parts too."""
    gen = torch.Generator().manual_seed(8)
    n = 48
    spec = list(zip([(40, n), (16, n), (16, n)], targets))
    method, layer, factors = _vllm_layer(spec, n, "auto", gen)
    calls = []
    real = ops.svf_group_mix
    monkeypatch.setattr(ops, "svf_group_mix",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    x = torch.randn(2, 5, n, generator=gen)
    y = method._factored(layer, x, None)
    assert calls == ["auto"]
    idx = layer.t2_token_slot[:10].long()
    want = []
    for i, ((m, _), target) in enumerate(spec):
        x64 = x.reshape(10, n).double()
        if target:
            U, S, Vh = factors[i]
            Z = layer.t2_alpha[0].double() @ getattr(layer, f"t2_bank{i}").double()
            want.append(svf_matmul_reference(x64, U.double(), S.double(), Vh.double(), Z, idx))
        else:
            want.append(x64 @ getattr(layer, f"t2_W{i}").double().T)
    torch.testing.assert_close(y.reshape(10, -1).double(), torch.cat(want, 1), rtol=1e-4,
                               atol=1e-4)


@on_cpu_kernels
def test_one_layer_decode_is_eight_kernel_launches(monkeypatch):
    """One decoder layer at decode through the vLLM methods (qkv, o, gate/up, down) on the Triton
    backend: two kernel launches per group, eight in all, and no memset, atomics or split sum
    (no other tensor op than the four groups' launches: views only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(9)
    h, inter, kv = 64, 96, 16
    layer_ops = [([(h, h), (kv, h), (kv, h)], h), ([(h, h)], h), ([(inter, h), (inter, h)], h),
                 ([(h, inter)], inter)]
    calls = []
    monkeypatch.setattr(shrink_expand, "svf_shrink_kernel",
                        _Spy(shrink_expand.svf_shrink_kernel, "shrink", calls))
    monkeypatch.setattr(shrink_expand, "svf_expand_kernel",
                        _Spy(shrink_expand.svf_expand_kernel, "expand", calls))

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not (name in ("view", "_unsafe_view", "reshape", "slice", "select", "t",
                             "transpose", "expand", "detach", "alias", "as_strided", "empty",
                             "empty_strided") or name.startswith("sym_")):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    built = [(*_vllm_layer([(s, True) for s in slices], n, "triton", gen)[:2],
              torch.randn(1, n, generator=gen)) for slices, n in layer_ops]
    counter = Count()
    with counter, torch.no_grad():
        for method, layer, x in built:
            method._factored(layer, x, None)
    assert [name for name, _ in calls] == ["shrink", "expand"] * 4
    assert all(meta["SPLIT_K"] == 1 for name, meta in calls if name == "shrink")
    assert counter.ops == ["svf_group_mix_triton"] * 4, counter.ops


@on_cpu_kernels
def test_compiled_graph_through_t2fast_ops_with_dynamic_token_count():
    """What the vLLM layers run, ``ops.svf_group_mix`` with ``backend="auto"``, in one compiled
    graph (fullgraph) with a dynamic token count: the backend choice stays inside the op."""
    gen = torch.Generator().manual_seed(10)
    slices, n = GROUPS["qkv"]
    Us, S, Vh, alpha, bank = _group(slices, n, torch.float32, "cpu", gen)
    slots = torch.randint(0, 5, (64,), generator=gen, dtype=torch.int32)

    def f(x):
        return ops.svf_group_mix(x, Us, S, Vh, alpha, bank, slots[:x.shape[0]], backend="auto",
                                 validate=False) * 2

    # as the layers do when built: a fullgraph trace cannot import the kernels' custom ops
    ops.resolve_backend("auto", torch.device("cpu"))
    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for T in (3, 7, 40):
        x = torch.randn(T, n, generator=gen)
        want = ops.svf_group_mix(x, Us, S, Vh, alpha, bank, slots[:T], backend="torch") * 2
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- Hugging Face layer groups

TINY = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _patched_tiny(tmp_path, backend, mix_in_kernel=False, **settings):
    import t2fast
    from t2fast.experts import Expert
    from t2fast.models import random_tiny_llama

    model = random_tiny_llama(seed=0, **TINY).eval()
    h = t2fast.patch_model(model, cache_dir=tmp_path / "svd", progress=False, backend=backend,
                           mix_in_kernel=mix_in_kernel, **settings)
    f = h.decomposition.factors
    h.add_experts([h.new_expert(n, Expert.random(n, f, scale=0.6, seed=s).z)
                   for n, s in (("a", 1), ("b", 2))])
    h.set_mixture(rows=["a", "b", {"a": 0.5, "b": 0.5}])
    return model, h


@on_cpu_kernels
@pytest.mark.parametrize("mix_in_kernel", [False, True], ids=["table", "mix"])
def test_hf_groups_share_factors_and_match_per_matrix_layers(tmp_path, mix_in_kernel):
    """patch_model links q/k/v and gate/up of each layer into one group whose stacked factors
    the members view; the grouped forward equals each member run alone."""
    model, h = _patched_tiny(tmp_path, "triton", mix_in_kernel)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.group
    assert group is attn.k_proj.group is attn.v_proj.group
    assert model.model.layers[0].mlp.gate_proj.group is model.model.layers[0].mlp.up_proj.group
    assert getattr(model.model.layers[0].mlp.down_proj, "group", None) is None
    assert attn.v_proj.Vh.untyped_storage().data_ptr() == group.Vh.untyped_storage().data_ptr()
    assert h.decomposition.factors[attn.k_proj.name].Vh is attn.k_proj.Vh
    ids = torch.randint(3, 60, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grouped = model(ids).logits
        for layer in h.modules.values():
            layer.group_saved, layer.group = getattr(layer, "group", None), None
        alone = model(ids).logits
        for layer in h.modules.values():
            layer.group = layer.group_saved
    torch.testing.assert_close(grouped, alone, rtol=1e-4, atol=1e-4)


def test_hf_group_recomputes_after_set_mixture_and_for_a_new_input(tmp_path):
    """A member never takes a stale share: a new mixture or a new input recomputes."""
    model, h = _patched_tiny(tmp_path, "torch")
    attn = model.model.layers[0].self_attn
    x, x2, x3 = torch.randn(3, 3, 1, 48).unbind(0)
    with torch.no_grad():
        q1 = attn.q_proj(x)
        h.set_mixture(rows=["b", "a", "a"])
        k_after = attn.k_proj(x)                      # a new mixture
        attn.q_proj(x2)
        v_new = attn.v_proj(x3)                       # another tensor
        attn.q_proj(x2)
        x2.add_(1.0)
        k_inplace = attn.k_proj(x2)                   # the same tensor, written in place
        for layer in h.modules.values():
            layer.group = None
        k_alone, q_alone = attn.k_proj(x), attn.q_proj(x)
        v_alone, k2_alone = attn.v_proj(x3), attn.k_proj(x2)
    torch.testing.assert_close(k_after, k_alone)
    torch.testing.assert_close(v_new, v_alone)
    torch.testing.assert_close(k_inplace, k2_alone)
    assert not torch.allclose(q1, q_alone)            # the first q saw the old mixture


@on_cpu_kernels
def test_one_hf_layer_decode_is_eight_launches(tmp_path, monkeypatch):
    """One Hugging Face decoder layer at decode on the Triton backend: q/k/v and gate/up run
    grouped — eight kernel launches, no other node (the group's z table is one stacked table
    of the runtime: nothing is concatenated per step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, h = _patched_tiny(tmp_path, "triton")
    layer = model.model.layers[0]
    calls = []
    monkeypatch.setattr(shrink_expand, "svf_shrink_kernel",
                        _Spy(shrink_expand.svf_shrink_kernel, "shrink", calls))
    monkeypatch.setattr(shrink_expand, "svf_expand_kernel",
                        _Spy(shrink_expand.svf_expand_kernel, "expand", calls))
    x = torch.randn(3, 1, 48)
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj(x)
        layer.self_attn.o_proj(torch.randn(3, 1, 48))
        layer.mlp.gate_proj(x)
        layer.mlp.up_proj(x)
        layer.mlp.down_proj(torch.randn(3, 1, 72))
    assert [name for name, _ in calls] == ["shrink", "expand"] * 4
    assert seen.count("svf_group_triton") == 2 and seen.count("svf_matmul_triton") == 2
    assert seen.count("cat") == 0


def _spy_deterministic(monkeypatch) -> dict:
    """Record the ``deterministic`` keyword of every call into the SVF ops (name → values)."""
    seen = {}
    for name in ("svf_matmul", "svf_matmul_mix", "svf_group", "svf_group_mix"):
        def spy(*a, _name=name, _real=getattr(ops, name), **k):
            seen.setdefault(_name, []).append(k["deterministic"])
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    return seen


SETTING = pytest.mark.parametrize("settings, want", [({}, True), ({"deterministic": False}, False)],
                                  ids=["default", "order-dependent"])


@SETTING
@pytest.mark.parametrize("mix_in_kernel", [False, True], ids=["table", "mix"])
def test_hf_layers_pass_the_deterministic_setting_to_the_ops(tmp_path, monkeypatch, settings,
                                                             want, mix_in_kernel):
    """SVFConfig.deterministic (default True) reaches every t2fast.ops call of the Hugging Face
    layers: the grouped q/k/v and gate/up, and o and down alone."""
    model, h = _patched_tiny(tmp_path, "torch", mix_in_kernel, **settings)
    assert h.config.deterministic is want
    seen = _spy_deterministic(monkeypatch)
    with torch.no_grad():
        model(torch.randint(3, 60, (3, 2), generator=torch.Generator().manual_seed(2)))
    layers = TINY["num_hidden_layers"]
    suffix = "_mix" if mix_in_kernel else ""
    assert seen == {f"svf_group{suffix}": [want] * 2 * layers,
                    f"svf_matmul{suffix}": [want] * 2 * layers}


@SETTING
def test_vllm_layers_pass_the_deterministic_setting_to_the_ops(monkeypatch, settings, want):
    """T2Config.deterministic (default True) reaches the vLLM layer's t2fast.ops call."""
    n = 32
    method, layer, _ = _vllm_layer([((16, n), True), ((8, n), True)], n, "torch",
                                   torch.Generator().manual_seed(3), **settings)
    seen = _spy_deterministic(monkeypatch)
    method._factored(layer, torch.randn(3, n), None)
    assert seen == {"svf_group_mix": [want]}
