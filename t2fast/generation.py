"""Batched generation with a KV cache: prefill, one decode step, n decode steps.

The pieces are small top-level functions (as in gpt-fast), so a caller can time or compile them
one by one: :func:`prefill` runs the left-padded prompts once and returns the last position's
logits and the cache; :func:`decode_one_token` feeds one token per row; :func:`decode_n_tokens`
loops, greedy or sampled (temperature, top-k) with an explicit ``torch.Generator`` so runs are
reproducible, every row stopping at its end-of-sequence token. :func:`generate` puts them
together for a list of prompts and returns a :class:`Rollout`.

Whatever the model's linear layers are (original, an SVF merged weight, per-row SVF mixtures
through the kernels, a LoRA adapter), the loop is the same; per-row mixtures are set by the
caller (``before_chunk`` of :func:`generate_texts`) for each chunk of rows. The trainer's
rollouts, the adaptation engine and the demo all generate through this module.
"""
from __future__ import annotations

import inspect
import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch


@lru_cache(maxsize=None)
def _cache_field() -> str:
    """The name of a Hugging Face model's KV cache, as keyword and as output field: ``cache``
    on recent transformers (which deprecated ``past_key_values``), ``past_key_values`` before.
    Read on first use (``CACHE_FIELD``), so importing this module does not import transformers.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) \
        else "past_key_values"


def __getattr__(name):
    if name == "CACHE_FIELD":       # the installed transformers' name for the KV cache
        return _cache_field()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=None)
def _forward_cache_field(cls) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return _cache_field()
    return next((n for n in ("cache", "past_key_values") if n in params), _cache_field())


def cache_field(model) -> str:
    """The KV cache's name for ``model``: the one its ``forward`` takes (an architecture not
    yet moved to a renamed keyword keeps the old one), else ``CACHE_FIELD``."""
    return _forward_cache_field(type(model))


@dataclass
class Rollout:
    """A batch of prompts and their completions.

    ``input_ids`` [B, P + G]: left-padded prompts (P columns) then completions (G columns, padded
    after the end-of-sequence token); ``attention_mask`` is 1 on real prompt tokens and on
    completion tokens up to and including end-of-sequence; ``completion_mask`` [B, G] (float) marks
    those completion tokens; ``texts`` are the decoded completions (special tokens removed).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    texts: list[str]

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def left_padding(tokenizer):
    """Pad on the left while the block runs (generation appends on the right). A tokenizer
    without a pad token (Llama-3's, Mistral's ...) pads with its end-of-sequence token meanwhile:
    padded positions are masked, so their id does not matter."""
    old = getattr(tokenizer, "padding_side", "left")
    borrow = getattr(tokenizer, "pad_token", None) is None and \
        getattr(tokenizer, "eos_token", None) is not None
    tokenizer.padding_side = "left"
    if borrow:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = old
        if borrow:
            tokenizer.pad_token = None


def special_ids(tokenizer, eos_token_id=None, pad_token_id=None) -> tuple[int, int]:
    """``(eos, pad)``: the given ids, else the tokenizer's (pad falls back to eos)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id=")
    if pad is None:
        pad = eos
    return int(eos), int(pad)


def stop_ids(model, eos: int) -> list[int]:
    """The ids that end a row: ``eos`` and every end-of-sequence id of the model's generation
    config (a chat model's end-of-turn token, e.g. Llama-3-Instruct's ``<|eot_id|>``)."""
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys([int(eos), *map(int, extra)]))


def prompt_list(prompts, where: str) -> list[str]:
    """``prompts`` as a list; one string is a TypeError (it would be read as one prompt per
    character)."""
    if isinstance(prompts, str):
        raise TypeError(f"{where}: prompts must be a sequence of strings, got one string; "
                        f"pass [prompt]")
    return list(prompts)


def check_batch_size(batch_size, where: str) -> None:
    """Raise ValueError unless ``batch_size`` (rows per generation call) is None or an integer
    ≥ 1 (a numpy integer too)."""
    if batch_size is None:
        return
    try:
        ok = not isinstance(batch_size, bool) and operator.index(batch_size) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: batch_size must be a positive int or None, got "
                         f"{batch_size!r}")


def position_limit(model) -> int | None:
    """How many positions ``model`` takes, or None when its config names no limit:
    ``max_position_embeddings`` (GPT-2's ``n_positions``), extended by a RoPE scaling factor
    as vLLM extends it (YaRN: the factor times ``original_max_position_embeddings``; linear,
    dynamic: the factor times the limit; Llama-3's and LongRoPE's limits already include it)."""
    config = getattr(model, "config", None)
    limit = next((v for v in (getattr(config, n, None) for n in ("max_position_embeddings",
                                                                  "n_positions"))
                  if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if limit is None or not isinstance(scaling, dict):
        return limit
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or kind in (None, "default", "llama3", "longrope",
                                                        "su"):
        return limit
    if kind == "yarn":
        return max(limit, int(scaling.get("original_max_position_embeddings", limit) * factor))
    return max(limit, int(limit * factor))


def check_positions(model, attention_mask: torch.Tensor, what: str = "row",
                    room: int = 0) -> int | None:
    """Raise ValueError naming the first row of ``attention_mask`` [B, L] (1 on real tokens)
    that, with ``room`` more tokens, would not fit ``model``'s positions; returns the limit
    (None: no limit). Beyond it a learned position table (GPT-2's) fails with an index error,
    a device-side assert on a GPU, and rotary positions run where the model was never trained.
    """
    limit = position_limit(model)
    if limit is not None:
        lengths = attention_mask.sum(-1)
        over = (lengths + room > limit).nonzero()
        if len(over):
            i = int(over[0, 0])
            needs = f" and {room} more for an answer" if room else ""
            raise ValueError(f"{what} {i} is {int(lengths[i])} tokens long{needs}; the model "
                             f"takes at most {limit} positions (its config's "
                             f"max_position_embeddings, with its RoPE scaling)")
    return limit


def pick_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of every row [B] (int64) from ``logits`` [B, V]: argmax, or a sample at
    ``temperature`` from the ``top_k`` most likely tokens (0: all)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:
        # torch.multinomial needs a generator on the probabilities' device
        u = torch.rand(probs.shape[0], 1, generator=generator).to(probs.device)
        return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the left-padded prompts ``input_ids`` [B, P] once.

    Returns ``(logits [B, V] of the last position, KV cache, position ids [B, 1] of the last
    position)``.
    """
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], getattr(out, cache_field(model)), pos[:, -1:]


def decode_one_token(model, token: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, past):
    """Feed one token per row (``token`` [B]; ``attention_mask`` [B, cached + 1],
    ``position_ids`` [B, 1] already include it); returns ``(logits [B, V], KV cache)``."""
    name = cache_field(model)
    out = model(input_ids=token[:, None], attention_mask=attention_mask,
                position_ids=position_ids, use_cache=True, **{name: past})
    return out.logits[:, -1], getattr(out, name)


def decode_n_tokens(model, logits: torch.Tensor, past, attention_mask: torch.Tensor,
                    last_pos: torch.Tensor, max_new_tokens: int, eos: int | Sequence[int],
                    pad: int, *, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, generator: torch.Generator | None = None,
                    max_positions: int | None = None):
    """Up to ``max_new_tokens`` tokens per row after :func:`prefill`; a row that produced ``eos``
    (one id, or any of several) gets ``pad`` from then on, and the loop stops once every row
    has. With ``max_positions``, a row also ends with the token at its last position
    (``max_positions - 1``); rows that ended are fed at that position, never beyond it.

    Returns ``(tokens [B, G] int64, alive [B, G] bool)``: ``alive`` marks the tokens produced
    before and including each row's end-of-sequence.
    """
    B, device = logits.shape[0], logits.device
    stops = torch.as_tensor(eos, device=device).reshape(-1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, alive = [], []
    for step in range(max_new_tokens):
        tok = pick_token(logits, do_sample, temperature, top_k, generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        alive.append(~finished)
        tokens.append(tok)
        finished = finished | torch.isin(tok, stops)
        last_pos = last_pos + 1                 # the position of ``tok``
        if max_positions is not None:
            finished = finished | (last_pos[:, 0] >= max_positions - 1)
            last_pos = last_pos.clamp(max=max_positions - 1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat(
            [attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype, device=device)], 1)
        logits, past = decode_one_token(model, tok, attention_mask, last_pos, past)
    return torch.stack(tokens, 1), torch.stack(alive, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None) -> Rollout:
    """Generate completions of ``prompts`` in one batch (see the module docstring).

    Greedy when ``do_sample`` is False. A row ends at ``eos_token_id`` when given, else at the
    tokenizer's end-of-sequence or any of the model's generation config (:func:`stop_ids`), or
    at the model's last position (:func:`position_limit`; a warning says how many rows it cut);
    stops early once every row has ended. A prompt that leaves no position for an answer is a
    ValueError.
    """
    prompts = prompt_list(prompts, "generate")
    if not prompts:
        raise ValueError("generate got no prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = special_ids(tokenizer, eos_token_id, pad_token_id)
    device = next(model.parameters()).device
    with left_padding(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ids = enc["input_ids"].to(device)
    am = enc["attention_mask"].to(device)
    limit = check_positions(model, am, "prompt", room=1)
    logits, past, last_pos = prefill(model, ids, am)
    stops = eos if eos_token_id is not None else stop_ids(model, eos)
    gen, cmask = decode_n_tokens(model, logits, past, am, last_pos, max_new_tokens, stops, pad,
                                 do_sample=do_sample, temperature=temperature, top_k=top_k,
                                 generator=generator, max_positions=limit)
    if limit is not None:
        n_out = cmask.sum(-1)
        last = gen.gather(1, (n_out - 1).clamp(min=0)[:, None])[:, 0]
        cut = (am.sum(-1) + n_out >= limit) & (n_out < max_new_tokens) \
            & ~torch.isin(last, torch.as_tensor(stops).to(last))
        if cut.any():
            warnings.warn(f"{int(cut.sum())} of {len(prompts)} completions filled the model's "
                          f"{limit} positions before their end-of-sequence and were cut there",
                          stacklevel=3)   # the caller, past no_grad's wrapper
    full_mask = torch.cat([am, cmask.long()], 1)
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(gen.cpu(), cmask.cpu())],
                                   skip_special_tokens=True)
    return Rollout(torch.cat([ids, gen], 1), full_mask, ids.shape[1], cmask.float(), texts)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, batch_size: int | None = None,
                   before_chunk: Callable[[int, int], None] | None = None, **kwargs) -> list[str]:
    """Completions (text) of many prompts, ``batch_size`` rows at a time.

    ``before_chunk(start, stop)`` is called before each chunk (e.g. to set that chunk's per-row
    expert mixtures); other keyword arguments go to :func:`generate`.
    """
    prompts = prompt_list(prompts, "generate_texts")
    check_batch_size(batch_size, "generate_texts")
    step = batch_size or max(1, len(prompts))
    out: list[str] = []
    for i in range(0, len(prompts), step):
        j = min(i + step, len(prompts))
        if before_chunk is not None:
            before_chunk(i, j)
        out.extend(generate(model, tokenizer, prompts[i:j], **kwargs).texts)
    return out
