"""A tiny random Llama with a character tokenizer, saved as a folder that both Hugging Face and
vLLM load, plus two random SVF experts for it. Used by the vLLM integration tests."""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(SPECIALS) + len(CHARS)

CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   clean_up_tokenization_spaces=False)


def build_model(seed: int = 0, init_std: float = 0.25, **overrides):
    """A random LlamaForCausalLM (float32, eval). A large init makes greedy decoding decisive,
    so token-for-token comparisons across implementations are not decided by rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**CONFIG, "initializer_range": init_std, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


def save_model(path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """The model of :func:`build_model`, stored in ``dtype`` (bfloat16: as real checkpoints are)."""
    path = Path(path)
    model = build_model(seed, **overrides).to(dtype)
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


def make_experts(model_path, out_dir, names=("math", "code", "neg"), scale: float = 0.5,
                 cache_dir=False, ones: str | None = "ones", targets="all",
                 layers=None) -> dict[str, Path]:
    """Random experts (z = 1 + scale·N(0, 1)) for the target projections of the model at
    model_path, and an identity expert (z = 1) named ``ones``."""
    from transformers import LlamaForCausalLM

    from t2fast.decompose import decompose_model
    from t2fast.experts import Expert

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    dec = decompose_model(model, targets, layers, cache_dir=cache_dir, progress=False)
    out = {}
    for i, name in enumerate(names):
        e = Expert.random(name, dec.factors, scale=scale, seed=100 + i, base_model="tiny")
        out[name] = e.save(Path(out_dir) / f"{name}.safetensors")
    if ones:
        out[ones] = Expert.ones(ones, dec.factors, base_model="tiny").save(
            Path(out_dir) / f"{ones}.safetensors")
    return out


def make_world(root, subset=None, **overrides) -> Path:
    """model/ (tiny Llama + tokenizer), model_bf16/ (the same weights stored in bfloat16),
    experts/ (math, code, neg, ones; made on the float32 model and served on both), svd/ (empty
    cache); with ``subset=(targets, layers)`` also experts/subset/ (math, code) for those
    matrices."""
    root = Path(root)
    save_model(root / "model", **overrides)
    save_model(root / "model_bf16", dtype=torch.bfloat16, **overrides)
    make_experts(root / "model", root / "experts")
    if subset is not None:
        make_experts(root / "model", root / "experts" / "subset", names=("math", "code"),
                     ones=None, targets=subset[0], layers=subset[1])
    (root / "svd").mkdir(parents=True, exist_ok=True)
    return root


def patched_model(world, experts, model_dir="model", expert_dir="experts", **settings):
    """(tokenizer, model, handle): the float32 Hugging Face model in ``world/model_dir`` patched
    by t2fast.patch_model (torch backend) with ``world/expert_dir/{name}.safetensors`` for each
    of ``experts`` and ``settings``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    import t2fast

    world = Path(world)
    tok = AutoTokenizer.from_pretrained(world / model_dir)
    model = LlamaForCausalLM.from_pretrained(world / model_dir, dtype=torch.float32).eval()
    handle = t2fast.patch_model(model, [world / expert_dir / f"{n}.safetensors" for n in experts],
                                backend="torch", progress=False, **settings)
    return tok, model, handle


@torch.no_grad()
def hf_reference(world, requests, max_tokens: int, experts=("math", "code", "neg", "ones"),
                 cache_dir=None, targets="all", layers=None, expert_dir="experts"):
    """Greedy tokens of each (prompt, patch_model mixture spec) from the Hugging Face model
    patched by t2fast.patch_model (one request at a time, full recompute each step).
    Returns (token lists, decomposition cache hits)."""
    tok, model, handle = patched_model(
        world, experts, expert_dir=expert_dir, targets=targets, layers=layers,
        cache_dir=cache_dir if cache_dir is not None else Path(world) / "svd")
    outs = []
    for prompt, spec in requests:
        handle.set_mixture(spec)
        ids = tok(prompt, return_tensors="pt").input_ids
        new = []
        for _ in range(max_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(new)
    return outs, handle.decomposition.cache_hits




@torch.no_grad()
def greedy_gaps(world, requests, tokens: list[list[int]], experts=("math", "code"),
                model_dir="model_bf16") -> list[float]:
    """How far each generated token sequence is from greedy under the float32 reference.

    ``tokens[i]`` (generated for ``requests[i] = (prompt, patch_model spec)``, e.g. by a bf16
    engine) is fed back through the checkpoint in ``world/model_dir`` loaded in float32 and
    patched by t2fast.patch_model with the same mixture; at each step the gap is the reference's
    largest logit minus its logit of the generated token (0 where the token is the reference's
    argmax). Returns the largest gap of each request.
    """
    tok, model, handle = patched_model(world, experts, model_dir=model_dir, cache_dir=False)
    gaps = []
    for (prompt, spec), new in zip(requests, tokens):
        handle.set_mixture(spec)
        ids = tok(prompt, return_tensors="pt").input_ids
        logits = model(torch.cat([ids, torch.tensor([new])], dim=1)).logits[0].float()
        steps = logits[ids.shape[1] - 1:-1]
        chosen = steps.gather(1, torch.tensor(new)[:, None])[:, 0]
        gaps.append(float((steps.max(dim=1).values - chosen).max()))
    return gaps
