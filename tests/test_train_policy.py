"""z parameterizations, the SVF / LoRA policies' modes, rollouts and teacher forcing."""
import pytest
import torch

from t2fast.models import build_char_tokenizer, generate_greedy, random_tiny_llama
from t2fast.train import (SVFPolicy, TrainConfig, ZParameterization, completion_logits, generate,
                          sequence_logprobs, teacher_batch, token_logprobs)


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["Q: 12+7=?\nA: ", "Q: reverse('abcd')\nA: ", "Q: Which is largest? A)1 B)2\nA: "]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def small_model(seed=0, layers=1):
    return random_tiny_llama(seed, num_hidden_layers=layers, hidden_size=64,
                             intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, initializer_range=0.1)


def svf_policy(model, parameterization="plain"):
    cfg = TrainConfig(task="arith", parameterization=parameterization, cache_dir=False)
    return SVFPolicy.create(model, cfg)


def test_plain_starts_at_one_and_official_is_rescaled():
    model = small_model()
    pol = svf_policy(model, "plain")
    for z in pol.param.effective().values():
        assert torch.equal(z, torch.ones_like(z))
    pol.close()
    pol = svf_policy(small_model(), "official")
    eff = pol.param.effective()
    for i, (n, z) in enumerate(eff.items()):
        assert torch.allclose(z, torch.ones_like(z), atol=1e-6)
    # after moving p, the official z keeps Σσ·z = Σσ (the rescaling) and stays positive
    with torch.no_grad():
        for p in pol.param.params:
            p.add_(torch.randn_like(p))
    for i, (n, z) in enumerate(pol.param.effective().items()):
        s = pol.param.sigma(i)
        assert (s * z).sum().item() == pytest.approx(s.sum().item(), rel=1e-5)
        assert (z > 0).all()
    assert all(not isinstance(z, torch.nn.Parameter) for z in pol.param.effective().values())


def test_bad_parameterization():
    with pytest.raises(ValueError, match="parameterization"):
        ZParameterization({}, "sigmoid")


@pytest.mark.parametrize("kind", ["plain", "official"])
def test_init_z_is_where_training_starts(kind):
    """An expert's z (official: rescaled, Σσz = Σσ, values above 1 included) is the effective
    z training starts from; names that are not targets, and (official) z ≤ 0, are refused."""
    from t2fast.decompose import decompose_model
    f = decompose_model(small_model(), cache_dir=False, progress=False).factors
    g = torch.Generator().manual_seed(0)
    init = {}
    for n, fac in f.items():
        z = 0.2 + 1.6 * torch.rand(fac.rank, generator=g)
        init[n] = z * (fac.S.sum() / (fac.S * z).sum())          # an official expert's z
    assert max(float(z.max()) for z in init.values()) > 1.2
    eff = ZParameterization(f, kind, init_z=init).effective()
    for n in f:
        torch.testing.assert_close(eff[n].detach(), init[n].float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"not targets: \['model\.layers\.0\.mlp\.DOWN'\]"):
        ZParameterization(f, kind, init_z={"model.layers.0.mlp.DOWN": torch.ones(3)})
    if kind == "official":
        n = next(iter(f))
        with pytest.raises(ValueError, match="only positive z"):
            ZParameterization(f, kind, init_z={n: init[n] - init[n].max()})


@pytest.mark.parametrize("parameterization", ["plain", "official"])
def test_training_mode_matches_acting_and_base(tok, parameterization):
    model = small_model()
    batch = teacher_batch(tok, PROMPTS, ["19", "dcba", "B"])
    with torch.no_grad():
        ref = completion_logits(model, batch)
    pol = svf_policy(model, parameterization)
    with torch.no_grad():
        for p in pol.param.params:
            p.add_(0.3 * torch.randn_like(p))
    with pol.training() as m:
        train_logits = completion_logits(m, batch)
    assert train_logits.requires_grad
    with pol.acting() as m:
        act_logits = completion_logits(m, batch)
    with pol.base() as m:
        base_logits = completion_logits(m, batch)
    assert torch.allclose(train_logits.detach(), act_logits, atol=1e-4)
    assert not torch.allclose(act_logits, ref, atol=1e-3)
    assert torch.equal(base_logits, ref)          # the original weights, exactly
    # gradients reach z only
    train_logits.sum().backward()
    assert all(p.grad is not None for p in pol.param.params)
    assert all(p.grad is None for p in model.parameters())


def test_generate_matches_hf_greedy_and_stops_at_eos(tok):
    model = small_model(1, layers=2)
    ro = generate(model, tok, PROMPTS, max_new_tokens=7)
    assert ro.texts == generate_greedy(model, tok, PROMPTS, max_new_tokens=7)
    assert ro.completion_ids.shape == (3, ro.completion_mask.shape[1])
    # rows stop at their own end of sequence: a head that makes row i write "x" i times, then </s>
    x_id = tok.convert_tokens_to_ids("x")

    class Head(torch.nn.Module):
        calls = 0

        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], tok.vocab_size if hasattr(tok, "vocab_size") else 100)
            for i in range(h.shape[0]):
                out[i, ..., x_id if Head.calls < i else tok.eos_token_id] = 10.0
            Head.calls += 1
            return out

    model.lm_head = Head()
    ro = generate(model, tok, PROMPTS, max_new_tokens=7)
    assert ro.texts == ["", "x", "xx"]
    assert ro.completion_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert ro.completion_ids[0, 1:].tolist() == [tok.pad_token_id] * 2
    assert ro.attention_mask[:, ro.prompt_len:].tolist() == ro.completion_mask.long().tolist()


def test_sampling_is_reproducible_and_logprobs_match_teacher_forcing(tok):
    model = small_model(2)
    a = generate(model, tok, PROMPTS * 2, max_new_tokens=5, do_sample=True,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, tok, PROMPTS * 2, max_new_tokens=5, do_sample=True,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids, b.input_ids)
    # the completion tokens scored by one teacher-forced forward equal the step-by-step
    # distributions of the decode loop (same prefix, same positions)
    lp = token_logprobs(completion_logits(model, a), a.completion_ids)
    with torch.no_grad():
        for t in range(a.completion_ids.shape[1]):
            rows = a.completion_mask[:, t] > 0
            if not rows.any():
                continue
            P = a.prompt_len + t
            out = model(input_ids=a.input_ids[rows, :P], attention_mask=a.attention_mask[rows, :P],
                        position_ids=a.position_ids()[rows, :P]).logits[:, -1]
            step_lp = torch.log_softmax(out, -1).gather(
                -1, a.completion_ids[rows, t:t + 1]).squeeze(-1)
            assert torch.allclose(step_lp, lp[rows, t], atol=1e-4)


def test_grouped_completion_logits_equal_plain(tok):
    """Samples of one prompt share one prompt forward (KV cache repeated): same logits, same
    gradients."""
    model = small_model(4, layers=2)
    pol = svf_policy(model)
    with torch.no_grad():
        for p in pol.param.params:
            p.add_(0.2 * torch.randn_like(p))
    prompts = [p for p in PROMPTS for _ in range(3)]
    ro = generate(model, tok, prompts, max_new_tokens=5, do_sample=True, temperature=2.0,
                  generator=torch.Generator().manual_seed(0))
    results = []
    for g in (1, 3):
        with pol.training() as m:
            logits = completion_logits(m, ro, group_size=g)
        (torch.log_softmax(logits, -1)[..., 7] * ro.completion_mask).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in pol.param.params]))
        for p in pol.param.params:
            p.grad = None
    (l1, g1), (l3, g3) = results
    assert torch.allclose(l1, l3, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g3))
    shuffled = generate(model, tok, PROMPTS * 3, max_new_tokens=2)
    with pytest.raises(ValueError, match="do not share their prompt"):
        completion_logits(model, shuffled, group_size=3)


def test_top_k_one_is_greedy(tok):
    model = small_model(3)
    g = generate(model, tok, PROMPTS, max_new_tokens=4)
    s = generate(model, tok, PROMPTS, max_new_tokens=4, do_sample=True, top_k=1,
                 generator=torch.Generator().manual_seed(0))
    assert g.texts == s.texts


def test_teacher_batch_layout(tok):
    b = teacher_batch(tok, PROMPTS[:2], ["19", "dcba"])
    assert b.completion_ids.shape == (2, 5)
    assert b.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b.completion_ids[0, 2].item() == tok.eos_token_id
    assert tok.decode(b.completion_ids[1, :4]) == "dcba"
    with pytest.raises(ValueError):
        teacher_batch(tok, PROMPTS, ["1"])


def test_sequence_logprobs_reductions(tok):
    model = small_model()
    b = teacher_batch(tok, PROMPTS[:2], ["19", "dcba"])
    logits = completion_logits(model, b)
    s = sequence_logprobs(logits, b.completion_ids, b.completion_mask, "sum")
    m = sequence_logprobs(logits, b.completion_ids, b.completion_mask, "mean")
    assert torch.allclose(m * b.completion_mask.sum(-1), s)


def test_lora_policy_modes(tok):
    pytest.importorskip("peft")
    from t2fast.train import LoRAPolicy
    model = small_model()
    batch = teacher_batch(tok, PROMPTS, ["19", "dcba", "B"])
    with torch.no_grad():
        ref = completion_logits(model, batch)
    pol = LoRAPolicy.create(model, TrainConfig(task="arith", method="lora", lora_rank=2,
                                               targets="mlp"))
    # 1 layer, mlp: gate/up (64 -> 128) and down (128 -> 64): r (m + n) each
    assert pol.num_parameters() == 3 * 2 * (64 + 128)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.2 * torch.randn_like(p))
    with pol.acting() as m:
        act = completion_logits(m, batch)
    with pol.base() as m:
        base = completion_logits(m, batch)
    assert torch.allclose(base, ref, atol=1e-6)
    assert not torch.allclose(act, ref, atol=1e-3)


@pytest.mark.parametrize("make, why", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "is not a LoRA adapter folder"),
    (lambda d: d / "e.safetensors", "does not exist; it is a t2fast expert"),
])
def test_lora_load_takes_local_folders_only(tmp_path, make, why):
    """A bad path is a FileNotFoundError naming it, before PEFT could look it up on the Hub."""
    from t2fast.train.policy import LoRAPolicy
    path = make(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"LoRA adapter '{path}' {why}"):
        LoRAPolicy.load(None, path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_reference_is_the_trainable_path_at_z_one(tok, dtype):
    """The KL's reference equals the policy at z = 1 on the trainable path, so that z = 1 has
    KL 0: in float32 it is the base model's own weights; in bf16 the rounded factors' product,
    which differs from the original weights."""
    from t2fast.models import load_tiny
    model, _ = load_tiny(dtype=dtype)
    batch = teacher_batch(tok, PROMPTS, ["19", "dcba", "B"])
    pol = svf_policy(model)
    with pol.training() as m, torch.no_grad():
        at_one = completion_logits(m, batch).float()
    with pol.reference() as m:
        reference = completion_logits(m, batch).float()
    with pol.base() as m:
        base = completion_logits(m, batch).float()
    if dtype == torch.float32:
        torch.testing.assert_close(reference, base, rtol=0, atol=0)
        torch.testing.assert_close(at_one, base, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(reference, at_one, rtol=0, atol=0)
        assert (at_one - base).abs().max() > 1e-2       # what the base weights would add
    assert all(layer.train_z is None for layer in pol.handle.modules.values())
    pol.close()


def test_acting_without_room_for_merged_weights_rebuilds_them_per_forward(tok):
    """Rollouts where the merged weights exceed the merge budget (a large model on a full
    device) run the trainable path without gradients, with one warning, instead of failing."""
    pol = svf_policy(small_model())
    with torch.no_grad():
        for p in pol.param.params:
            p.add_(0.3 * torch.randn_like(p))
    batch = teacher_batch(tok, PROMPTS, ["19", "dcba", "B"])
    with pol.acting() as m:
        merged = completion_logits(m, batch)
    assert pol.handle.runtime.mode == "base"
    pol.handle.runtime.merge_cache.budget = 1
    with pytest.warns(RuntimeWarning, match="merge cache's budget.*rebuild each adapted weight"):
        with pol.acting() as m:
            rebuilt = completion_logits(m, batch)
    torch.testing.assert_close(rebuilt, merged, rtol=1e-5, atol=1e-5)
    assert not rebuilt.requires_grad
    assert all(layer.train_z is None for layer in pol.handle.modules.values())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # warned once per policy
        with pol.acting() as m:
            completion_logits(m, batch)
    pol.close()


def test_a_lora_adapter_of_other_shapes_is_named(tmp_path):
    """PEFT's "size mismatch" RuntimeError (a traceback on the command line) is a ValueError
    naming the adapter."""
    peft = pytest.importorskip("peft")
    from t2fast.train.policy import LoRAPolicy

    other = peft.get_peft_model(random_tiny_llama(0, num_hidden_layers=1, hidden_size=32,
                                                  intermediate_size=64, num_attention_heads=2,
                                                  num_key_value_heads=1),
                                peft.LoraConfig(r=2, target_modules=["down_proj"]))
    other.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"LoRA adapter '.*lora' was made for a model of other "
                                         r"shapes: size mismatch for .*down_proj"):
        LoRAPolicy.load(small_model(), tmp_path / "lora")


def test_patching_a_model_that_carries_a_lora_adapter_names_it(tmp_path):
    """The expert's matrices are not found by name in a PeftModel: the error blamed the expert
    ("made for another model")."""
    peft = pytest.importorskip("peft")
    import t2fast
    from t2fast.experts import Expert

    model = small_model()
    factors = t2fast.decompose_model(model, cache_dir=False, progress=False).factors
    path = Expert.ones("e", factors).save(tmp_path / "e.safetensors")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"this model carries PEFT adapters .*merge_and_unload"):
        t2fast.patch_model(wrapped, experts=[path], cache_dir=False, progress=False)
