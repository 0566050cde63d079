"""patch_model on every common decoder family, built offline from a transformers config:
Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms), Gemma, Phi-3 (fused qkv_proj and
gate_up_proj, split per logical matrix)."""
import pytest
import torch
from torch import nn

import t2fast
from t2fast.experts import Expert
from t2fast.layers import FusedSVF, SVFLinear
from t2fast.targets import resolve_targets

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}
LOGICAL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(3, 60, (3, 6), generator=torch.Generator().manual_seed(0))


def _model(family, seed=0):
    import transformers
    cfg_name, cls_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**SIZES, **extra)
    return getattr(transformers, cls_name)(cfg).eval()


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_patches_every_logical_matrix(family, svd_cache, tmp_path):
    model = _model(family)
    ref = _logits(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    h = t2fast.patch_model(model, cache_dir=svd_cache, hybrid=False, progress=False)
    assert sorted(h.targets) == sorted(
        f"model.layers.{i}.{'self_attn' if p in LOGICAL[:4] else 'mlp'}.{p}"
        for i in range(2) for p in LOGICAL), h.targets
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)
    if family == "phi3":
        assert isinstance(model.model.layers[0].self_attn.qkv_proj, FusedSVF)
        assert isinstance(model.model.layers[0].mlp.gate_up_proj, FusedSVF)
        assert h.modules["model.layers.0.self_attn.k_proj"].out_features == 16

    f = h.decomposition.factors
    h.add_experts([h.new_expert(n, Expert.random(n, f, 0.5, s).z) for n, s in (("a", 1),
                                                                               ("b", 2))])
    rows = ["a", None, {"a": 0.5, "b": 0.5}]
    h.set_mixture(rows=rows)
    batch = _logits(model)
    assert (batch[0] - ref[0]).abs().max() > 1e-3, "an expert must change the logits"
    torch.testing.assert_close(batch[1], ref[1], rtol=1e-4, atol=1e-4)
    for i, spec in enumerate(rows):
        h.merge(spec)
        torch.testing.assert_close(_logits(model, IDS[i:i + 1])[0], batch[i], rtol=1e-4,
                                   atol=1e-4)

    h.merge("a")                        # a merged model saves in the original layout
    adapted = _logits(model)
    state = model.state_dict()
    assert set(state) == set(keys)
    h.restore()
    assert all(torch.equal(model.state_dict()[k], keys[k]) for k in keys), "restore is exact"
    fresh = _model(family, seed=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(_logits(fresh), adapted, rtol=1e-5, atol=1e-5)


def test_phi3_partial_targets_keep_the_other_rows_dense(svd_cache):
    model = _model("phi3")
    ref = _logits(model)
    assert resolve_targets(model, ["qkv_proj"], layers=[1]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj"]
    h = t2fast.patch_model(model, targets=["k_proj", "up_proj"], cache_dir=svd_cache,
                           progress=False)
    assert h.targets == [f"model.layers.{i}.{m}" for i in range(2)
                         for m in ("self_attn.k_proj", "mlp.up_proj")]
    parts = model.model.layers[0].self_attn.qkv_proj.parts
    assert [type(p) for p in parts] == [nn.Linear, SVFLinear, nn.Linear]
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)
    h.restore()
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, nn.Linear)


def test_unknown_projections_are_listed_not_skipped():
    model = _model("llama")
    model.model.layers[1].mlp.extra_proj = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"1 linear modules of the decoder layers.*"
                                         r"cannot be adapted: \['model\.layers\.1\.mlp\."
                                         r"extra_proj'\]"):
        resolve_targets(model, "all")
    assert len(resolve_targets(model, "mlp")) == 6          # an explicit choice is fine


def _gptj():
    """GPT-J: decoder layers in ``transformer.h.N``, projections q/k/v, out_proj, fc_in/out."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, vocab_size=64,
                                  n_positions=64, bos_token_id=1, eos_token_id=2)
    return transformers.GPTJForCausalLM(cfg).eval()


def test_layers_in_h_lists_are_addressed_per_layer(svd_cache):
    """``transformer.h.N`` is a decoder-layer list like ``model.layers.N``: per-layer α reaches
    each layer, and targets='all' names the projections it cannot adapt instead of adapting
    only q, k and v."""
    model = _gptj()
    with pytest.raises(ValueError, match=r"9 linear modules.*transformer\.h\.0\.attn\.out_proj"):
        resolve_targets(model, "all")
    names = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
    h = t2fast.patch_model(model, targets=names, cache_dir=svd_cache, progress=False)
    assert len(h.targets) == 18 and h.num_layers == 3
    assert [h.modules[f"transformer.h.{i}.mlp.fc_in"].layer for i in range(3)] == [0, 1, 2]
    h.add_experts([h.new_expert("e", Expert.random("e", h.decomposition.factors, 0.5, 1).z)])
    h.set_mixture("e")
    whole = _logits(model)
    h.set_mixture({"e": [1.0, 0.0, 0.0], "base": [0.0, 1.0, 1.0]})     # the first layer only
    first = _logits(model)
    h.set_mixture(None)
    base = _logits(model)
    assert (first - whole).abs().max() > 1e-3 and (first - base).abs().max() > 1e-3
    h.restore()


def test_matrices_outside_any_layer_list_are_refused():
    """A multi-layer model whose selected matrix sits outside every known decoder-layer list
    would silently share layer 0's α: refused, naming it."""
    model = _model("llama")
    model.lm_head_proj = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"cannot tell which decoder layer \['lm_head_proj'\]"):
        resolve_targets(model, ["lm_head_proj"])


def test_target_names_that_match_nothing_are_named():
    """A misspelled name, or a full name of a layer the model lacks, beside names that match:
    refused (it used to adapt the others silently); a preset's names need not all exist."""
    from t2fast.models import random_tiny_llama
    from t2fast.targets import resolve_targets

    model = random_tiny_llama(0, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"targets \['dwn_proj'\] match no nn.Linear module"):
        resolve_targets(model, ["q_proj", "dwn_proj"])
    with pytest.raises(ValueError, match=r"layers.7.self_attn.q_proj'\] match no nn.Linear"):
        resolve_targets(model, ["model.layers.0.self_attn.q_proj",
                                "model.layers.7.self_attn.q_proj"])
    assert len(resolve_targets(model, ["q_proj", "model.layers.*.mlp.*"])) == 8
    assert len(resolve_targets(model, "mlp")) == 6
