"""Importing the official Transformer² code's checkpoints.

The tests write checkpoints in the official formats themselves — ``policy_params.pt`` of an SVF
policy (a ``learnable_params_module_list`` ParameterList of bf16 pre-sigmoid vectors, MLP
matrices in state_dict order), the legacy ``learnable_params.pt`` (the same vectors keyed by
parameter name) and ``policy_params.pt`` of a weighted combination (``adaptive_weights`` and the
experts' raw vectors as ``weights_K_k_NAME`` buffers) — and check the imported expert against an
independent float64 implementation of the official formula
``W' = U diag(σ ⊙ m) Vᵀ · Σσ / Σ(σ ⊙ m)``, with ``m = sigmoid(p)`` for a policy and
``m = Σ_k c_k p_k`` (raw vectors, no sigmoid) for a weighted combination.
"""
import pytest
import torch
from torch import nn

import t2fast
from t2fast import cli
from t2fast.experts import load_expert
from t2fast.models import random_tiny_llama
from t2fast.official import import_official, official_targets
from t2fast.safetensors_io import T2FileError

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


class OfficialPolicy(nn.Module):
    """The official policy's saved layout: ``learnable_params_module_list`` of bf16 vectors."""

    def __init__(self, ps):
        super().__init__()
        self.learnable_params_module_list = nn.ParameterList(
            [nn.Parameter(p.to(torch.bfloat16)) for p in ps])


class OfficialCombination(nn.Module):
    """A weighted-combination policy's saved layout: ``adaptive_weights`` [K, 1 or M] and the
    K experts' raw vectors as buffers ``weights_{k}_k_{name with '.' -> '_'}``."""

    def __init__(self, experts, alpha):
        super().__init__()
        self.adaptive_weights = nn.Parameter(alpha)
        for key in experts[0]:
            for k, ps in enumerate(experts):
                if key in ps:
                    self.register_buffer(f"weights_{k}_k_{key.replace('.', '_')}", ps[key])


def _official_w(weight, p=None, mask=None):
    """The official code's W' for a policy's raw p (its mask is sigmoid of the bf16 p, in
    bf16) or for a given mask."""
    U, S, V = torch.svd(weight.double())
    m = torch.sigmoid(p.to(torch.bfloat16)).double() if mask is None else mask.double()
    return (U @ torch.diag(S * m) @ V.T) * (S.sum() / (S * m).sum())


def _assert_official_weights(model, expert, masks, svd_cache):
    """Patched with ``expert``, every MLP matrix of ``model`` is the official W' of its
    ``masks`` entry ({parameter name: raw p (tensor) or ("mask", tensor)})."""
    h = t2fast.patch_model(model, experts=[expert], targets="mlp", cache_dir=svd_cache,
                           progress=False)
    h.merge(expert.name)
    try:
        for key, p in masks.items():
            name = key[:-len(".weight")]
            dense = h.modules[name].dense
            want = (_official_w(dense, mask=p[1]) if isinstance(p, tuple) else
                    _official_w(dense, p))
            torch.testing.assert_close(h.modules[name].dense_weight().double(), want, rtol=0,
                                       atol=2e-5)
    finally:
        h.restore()


def _raw_vectors(model, seed=0):
    """{MLP parameter name: a bf16 raw vector p} in the model's state_dict order."""
    mlp = [k for k in model.state_dict() if "mlp" in k]
    assert mlp[:3] == [f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    g = torch.Generator().manual_seed(seed)
    return {k: (2.0 + 0.8 * torch.randn(min(model.state_dict()[k].shape), generator=g))
            .to(torch.bfloat16) for k in mlp}


def _checkpoint(model, folder):
    """An official-format checkpoint for ``model`` in ``folder/policy_params.pt``, and its p."""
    ps = _raw_vectors(model)
    folder.mkdir()
    torch.save(OfficialPolicy(list(ps.values())).state_dict(), folder / "policy_params.pt")
    return folder / "policy_params.pt", ps


@pytest.fixture
def checkpoint(tmp_path):
    model = random_tiny_llama(seed=0, **TINY).eval()
    return (model, *_checkpoint(model, tmp_path / "math"))


def test_imported_expert_gives_the_official_weights(checkpoint, svd_cache):
    model, path, ps = checkpoint
    expert = import_official(path, model, cache_dir=svd_cache, progress=False)
    assert expert.name == "math" and expert.targets == official_targets(model)
    assert expert.extra["format"] == "policy"
    _assert_official_weights(model, expert, ps, svd_cache)


def test_legacy_learnable_params_file(checkpoint, svd_cache, tmp_path):
    """``save_legacy_params``: a dict {parameter name: nn.Parameter p} gives the same expert
    as the policy_params.pt of the same run."""
    model, path, ps = checkpoint
    legacy = path.parent / "learnable_params.pt"
    torch.save({k: nn.Parameter(p) for k, p in ps.items()}, legacy)
    expert = import_official(legacy, model, cache_dir=svd_cache, progress=False)
    assert expert.name == "math" and expert.extra["format"] == "legacy"
    policy = import_official(path, model, cache_dir=svd_cache, progress=False)
    for t in policy.targets:
        assert torch.equal(expert.z[t], policy.z[t])
    _assert_official_weights(model, expert, ps, svd_cache)
    # a float32 file is what a weighted-combination run saves there: said, not refused
    torch.save({k: p.float() for k, p in ps.items()}, tmp_path / "f32.pt")
    with pytest.warns(UserWarning, match="holds float32 vectors.*policy_params.pt instead"):
        import_official(tmp_path / "f32.pt", model, cache_dir=svd_cache, progress=False)
    # names that are not the model's
    wrong = dict(ps)
    wrong["model.layers.9.mlp.up_proj.weight"] = wrong.pop("model.layers.1.mlp.up_proj.weight")
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"1 of its MLP matrices are missing \(e\.g\. "
                                         r"\['model\.layers\.1\.mlp\.up_proj\.weight'\]\); 1 "
                                         r"names are not the model's"):
        import_official(tmp_path / "wrong.pt", model, cache_dir=svd_cache, progress=False)


@pytest.mark.parametrize("per_layer", [False, True], ids=["one-alpha", "per-matrix"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "normalized"])
def test_weighted_combination_gives_the_official_weights(tmp_path, svd_cache, per_layer, norm):
    """The official weighted combination mixes the experts' raw vectors with adaptive_weights
    (divided by their sum over experts with norm_coeffs) and applies no sigmoid."""
    model = random_tiny_llama(seed=0, **TINY).eval()
    experts = [_raw_vectors(model, seed) for seed in (1, 2)]
    M = len(experts[0])
    g = torch.Generator().manual_seed(3)
    alpha = (torch.rand(2, M if per_layer else 1, generator=g) * 0.8 + 0.2)
    folder = tmp_path / "fewshot_math"
    folder.mkdir()
    path = folder / "policy_params.pt"
    torch.save(OfficialCombination(experts, alpha).state_dict(), path)
    expert = import_official(path, model, cache_dir=svd_cache, progress=False,
                             norm_coeffs=norm)
    assert expert.name == "fewshot_math" and expert.extra["format"] == "weighted-combination"
    assert expert.extra["norm_coeffs"] is norm
    torch.testing.assert_close(torch.tensor(expert.extra["alpha"], dtype=torch.float64),
                               alpha.double())
    c = (alpha / alpha.sum(0) if norm else alpha).double().expand(2, M)
    masks = {k: ("mask", c[0, i] * experts[0][k].double() + c[1, i] * experts[1][k].double())
             for i, k in enumerate(experts[0])}
    _assert_official_weights(model, expert, masks, svd_cache)
    with pytest.raises(ValueError, match="does not record the run's norm_coeffs"):
        import_official(path, model, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="max_mult must stay 1"):
        import_official(path, model, max_mult=2.0, cache_dir=False, progress=False,
                        norm_coeffs=norm)


def test_cli_import_official_writes_a_loadable_expert(tmp_path, capsys, monkeypatch,
                                                       one_thread):
    monkeypatch.setenv("T2FAST_CACHE", str(tmp_path / "cache"))
    path, _ = _checkpoint(random_tiny_llama(0, num_hidden_layers=2), tmp_path / "math")
    out = tmp_path / "official.safetensors"
    assert cli.main(["import-official", str(path), "--model", "random:0:2", "--out", str(out),
                     "--name", "gsm8k"]) == 0
    assert "wrote expert 'gsm8k' (6 matrices)" in capsys.readouterr().out
    e = load_expert(out)
    assert e.name == "gsm8k" and e.extra["file"] == "policy_params.pt"
    # the CLI patches the matrices the expert adapts (MLP only), not the default "all"
    assert cli.main(["eval", "--task", "arith", "--model", "random:0:2", "--expert", str(out),
                     "--n", "1"]) == 0
    assert cli.main(["adapt", "--model", "random:0:2", "--experts", str(out), "--strategy",
                     "expert:gsm8k", "--task", "arith", "--n", "1"]) == 0
    folder = tmp_path / "official-folder"
    assert cli.main(["import-official", str(path), "--model", "random:0:2", "--out",
                     str(folder)]) == 0
    assert load_expert(folder).name == "math"
    # run beside the checkpoint, as the README shows: the run's folder still names it
    monkeypatch.chdir(path.parent)
    assert cli.main(["import-official", path.name, "--model", "random:0:2", "--out",
                     str(tmp_path / "here.safetensors")]) == 0
    assert load_expert(tmp_path / "here.safetensors").name == "math"
    bad = tmp_path / "my run"
    bad.mkdir()
    (bad / "policy_params.pt").write_bytes(path.read_bytes())
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("loaded before the check"))
    assert cli.main(["import-official", str(bad / "policy_params.pt"), "--model", "random:0:2",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "argument --name: the name taken from" in capsys.readouterr().err


def test_cli_import_official_weighted_combination_needs_norm_coeffs(tmp_path, capsys,
                                                                    monkeypatch, one_thread):
    monkeypatch.setenv("T2FAST_CACHE", str(tmp_path / "cache"))
    model = random_tiny_llama(0, num_hidden_layers=2)
    path = tmp_path / "policy_params.pt"
    torch.save(OfficialCombination([_raw_vectors(model, 1), _raw_vectors(model, 2)],
                                   torch.tensor([[0.4], [0.6]])).state_dict(), path)
    out = tmp_path / "cem.safetensors"
    args = ["import-official", str(path), "--model", "random:0:2", "--out", str(out)]
    assert cli.main(args) == 2
    assert "--norm-coeffs true|false" in capsys.readouterr().err and not out.exists()
    assert cli.main([*args, "--norm-coeffs", "false", "--name", "cem"]) == 0
    assert load_expert(out).extra["norm_coeffs"] is False
    for bad, flag in ((["--norm-coeffs", "maybe"], "--norm-coeffs"),
                      (["--max-mult", "0"], "--max-mult"), (["--name", "a b"], "--name"),
                      (["--model", "random:x"], "--model")):
        assert cli.main([*args, *bad]) == 2
        assert f"argument {flag}" in capsys.readouterr().err
    assert cli.main(["import-official", str(tmp_path / "absent.pt"), "--out", str(out)]) == 2
    assert "argument checkpoint: official checkpoint '" in capsys.readouterr().err


def test_bad_weighted_combinations(tmp_path):
    model = random_tiny_llama(seed=0, **TINY)
    experts = [_raw_vectors(model, 1), _raw_vectors(model, 2)]

    def attempt(experts, alpha, norm=False):
        path = tmp_path / "policy_params.pt"
        torch.save(OfficialCombination(experts, alpha).state_dict(), path)
        import_official(path, model, cache_dir=False, progress=False, norm_coeffs=norm)

    with pytest.raises(ValueError, match=r"adaptive_weights has shape \(3, 1\) but the file "
                                         r"holds 2 experts and the model 6 MLP matrices"):
        attempt(experts, torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"adaptive_weights has shape \(2, 4\)"):
        attempt(experts, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"by its sum over the experts, which is 0"):
        attempt(experts, torch.tensor([[1.0], [-1.0]]), norm=True)
    short = dict(experts[1])
    short.pop("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=r"\(expert 1 of the combination\) does not fit the "
                                         r"model: 1 of its MLP matrices are missing"):
        attempt([experts[0], short], torch.ones(2, 1))
    negative = {k: -p for k, p in experts[0].items()}
    with pytest.raises(ValueError, match=r"mask of model\.layers\.0\.mlp\.gate_proj gives "
                                         r"Σ\(σ ⊙ mask\) = -"):
        attempt([negative, negative], torch.ones(2, 1))
    with pytest.raises(ValueError, match="norm_coeffs does not apply"):
        path, _ = _checkpoint(model, tmp_path / "plain")
        import_official(path, model, cache_dir=False, progress=False, norm_coeffs=True)


def _write(tmp_path, state):
    p = tmp_path / "bad.pt"
    torch.save(state, p)
    return p


@pytest.mark.parametrize("state, error, pattern", [
    ({"weights": torch.ones(3)}, T2FileError, r"unexpected key 'weights'"),
    ({"learnable_params_module_list.1": torch.ones(3)}, T2FileError, r"indices are not 0\.\.0"),
    ({"learnable_params_module_list.0": torch.ones(2, 2)}, T2FileError, r"must be a 1-D float"),
    ({"learnable_params_module_list.0": torch.tensor([float("nan")])}, T2FileError, r"NaN"),
    ({f"learnable_params_module_list.{i}": torch.ones(32) for i in range(5)}, ValueError,
     r"holds 5 vectors but the model has 6 MLP matrices"),
    ({f"learnable_params_module_list.{i}": torch.ones(31) for i in range(6)}, ValueError,
     r"learnable_params_module_list\.0 has length 31 but model\.layers\.0\.mlp\.gate_proj has "
     r"rank 32"),
])
def test_bad_checkpoints(tmp_path, state, error, pattern):
    model = random_tiny_llama(seed=0, **TINY)
    with pytest.raises(error, match=pattern):
        import_official(_write(tmp_path, state), model, cache_dir=False, progress=False)


def test_pickled_objects_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"learnable_params_module_list.0": Evil()}, p)
    with pytest.raises(T2FileError, match=r"weights_only=True: Unsupported global") as e:
        import_official(p, random_tiny_llama(seed=0, **TINY), cache_dir=False, progress=False)
    assert "weights_only=False" not in str(e.value) and len(str(e.value)) < 400
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(T2FileError, match=r"garbage\.pt' is not a checkpoint") as e:
        import_official(garbage, random_tiny_llama(seed=0, **TINY), cache_dir=False,
                        progress=False)
    assert "weights_only=False" not in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(T2FileError, match="does not exist"):
        import_official(tmp_path / "none.pt", random_tiny_llama(seed=0, **TINY))


def test_fused_mlp_models_are_refused_with_a_reason():
    from transformers import Phi3Config, Phi3ForCausalLM
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, **TINY))
    with pytest.raises(ValueError, match=r"fused projection model\.layers\.0\.mlp\."
                                         r"gate_up_proj as one matrix"):
        official_targets(phi3)
