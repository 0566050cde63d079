"""Importing the official Transformer² code's checkpoints (policy_params.pt).

The test writes a checkpoint in that format itself (a ``learnable_params_module_list``
ParameterList of bf16 pre-sigmoid vectors, MLP matrices in state_dict order) and checks the
imported expert against an independent float64 implementation of the official formula
``W' = U diag(σ ⊙ m) Vᵀ · Σσ / Σ(σ ⊙ m)``, ``m = sigmoid(p)``.
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


def _official_w(weight, p):
    """The official code's W' (its mask is sigmoid of the bf16 p, in bf16)."""
    U, S, V = torch.svd(weight.double())
    m = torch.sigmoid(p.to(torch.bfloat16)).double()
    return (U @ torch.diag(S * m) @ V.T) * (S.sum() / (S * m).sum())


def _checkpoint(model, folder):
    """An official-format checkpoint for ``model`` in ``folder/policy_params.pt``, and its p."""
    mlp = [k for k in model.state_dict() if "mlp" in k]
    assert mlp[:3] == [f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    g = torch.Generator().manual_seed(0)
    ps = [(2.0 + 0.8 * torch.randn(min(model.state_dict()[k].shape), generator=g))
          .to(torch.bfloat16) for k in mlp]
    folder.mkdir()
    torch.save(OfficialPolicy(ps).state_dict(), folder / "policy_params.pt")
    return folder / "policy_params.pt", dict(zip(mlp, ps))


@pytest.fixture
def checkpoint(tmp_path):
    model = random_tiny_llama(seed=0, **TINY).eval()
    return (model, *_checkpoint(model, tmp_path / "math"))


def test_imported_expert_gives_the_official_weights(checkpoint, svd_cache):
    model, path, ps = checkpoint
    expert = import_official(path, model, cache_dir=svd_cache, progress=False)
    assert expert.name == "math" and expert.targets == official_targets(model)
    h = t2fast.patch_model(model, experts=[expert], targets="mlp", cache_dir=svd_cache,
                           progress=False)
    h.merge("math")
    for key, p in ps.items():
        name = key[:-len(".weight")]
        want = _official_w(h._dense[name].weight, p)
        torch.testing.assert_close(h.modules[name].merged.double(), want, rtol=0, atol=2e-5)


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
    folder = tmp_path / "official-folder"
    assert cli.main(["import-official", str(path), "--model", "random:0:2", "--out",
                     str(folder)]) == 0
    assert load_expert(folder).name == "math"


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
    with pytest.raises(T2FileError, match=r"weights_only=True"):
        import_official(p, random_tiny_llama(seed=0, **TINY), cache_dir=False, progress=False)
    with pytest.raises(T2FileError, match="does not exist"):
        import_official(tmp_path / "none.pt", random_tiny_llama(seed=0, **TINY))


def test_fused_mlp_models_are_refused_with_a_reason():
    from transformers import Phi3Config, Phi3ForCausalLM
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, **TINY))
    with pytest.raises(ValueError, match=r"fused projection model\.layers\.0\.mlp\."
                                         r"gate_up_proj as one matrix"):
        official_targets(phi3)
