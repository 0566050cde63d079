"""The bundled tiny Llama model of the tiny world, its character tokenizer, and random tiny models.

The weights are trained by ``scripts/train_tiny_model.py`` and shipped under
``t2fast/assets/tiny_llama/``; loading them needs no network.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
#: Characters of the vocabulary after the special tokens: newline and printable ASCII.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 100

#: Shape of the bundled model (kept small so decomposing every projection is fast on CPU).
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

#: Chat template: user turns are questions, assistant turns answers, in the tasks' template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'A: ' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)

_ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "tiny_llama"


def tiny_model_path() -> pathlib.Path:
    """Folder of the bundled model (config.json, model.safetensors, tokenizer.json, ...),
    loadable by ``AutoModelForCausalLM.from_pretrained`` and by vLLM."""
    return _ASSET_DIR


#: The shipped experts: in an installed wheel ``t2fast/assets/experts/`` (setup.py puts them
#: there), in a source checkout the repository's ``experts/`` folder (their source; the folder
#: above the package counts only where it holds the project, not in site-packages).
_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
_EXPERT_DIRS = (_ASSET_DIR.parent / "experts",
                *((_CHECKOUT / "experts",) if (_CHECKOUT / "pyproject.toml").is_file() else ()))


def tiny_experts() -> dict[str, pathlib.Path]:
    """The SVF experts shipped for the bundled model, ``{name: path to .safetensors}``: one per
    training family (``arith``, ``strings``, ``choice``) and the classification expert
    (``classify``), trained by ``scripts/make_results.py --train``."""
    for folder in _EXPERT_DIRS:
        found = sorted(folder.glob("*.safetensors"))
        if found:
            return {path.stem: path for path in found}
    raise FileNotFoundError(f"no shipped experts in {' or '.join(map(str, _EXPERT_DIRS))}; "
                            f"reinstall t2fast, or train them with `t2fast train`")


def tiny_expert(name: str) -> pathlib.Path:
    """Path of the shipped expert ``name`` (see :func:`tiny_experts`), e.g. for
    ``t2fast.patch_model(model, experts=[tiny_expert("arith")])``."""
    experts = tiny_experts()
    if name not in experts:
        raise ValueError(f"name must be one of the shipped experts {sorted(experts)}, got {name!r}")
    return experts[name]


def build_char_tokenizer():
    """The character-level tokenizer as a ``PreTrainedTokenizerFast``.

    One token per character (newline and printable ASCII), ``<s>`` prepended to every encoded
    text, ``</s>`` ends answers, ``<pad>`` pads (on the left, for batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    assert len(vocab) == VOCAB_SIZE
    # A BPE model without merges splits text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)


def tiny_config(**overrides):
    """A ``LlamaConfig`` of the bundled model's shape (with ``overrides``)."""
    from transformers import LlamaConfig

    kwargs = dict(TINY_CONFIG)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_tiny_llama(seed: int = 0, **config_overrides):
    """A randomly initialised tiny ``LlamaForCausalLM`` (float32, eval mode) for tests.

    Same shape as the bundled model unless ``config_overrides`` say otherwise (e.g.
    ``num_hidden_layers=2``). Deterministic for a given seed.
    """
    from transformers import LlamaForCausalLM

    config = tiny_config(**config_overrides)
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def save_tiny(model, tokenizer, path: str | pathlib.Path, extra_config: dict | None = None) -> None:
    """Write a model + tokenizer folder loadable by transformers and vLLM (float32 safetensors)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if extra_config:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(extra_config)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tiny(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              path: str | pathlib.Path | None = None):
    """The bundled trained model and its tokenizer: ``(LlamaForCausalLM, PreTrainedTokenizerFast)``.

    The model is in eval mode on ``device`` in ``dtype``. No network access is needed.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = pathlib.Path(path) if path is not None else tiny_model_path()
    if not (path / "model.safetensors").exists():
        bundled = path.resolve() == tiny_model_path()
        raise FileNotFoundError(f"no model.safetensors in {path}" + (
            " (the bundled model's folder: reinstall t2fast)" if bundled else ""))
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, up to the end-of-sequence token,
    special tokens removed). Batched with left padding."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outs
