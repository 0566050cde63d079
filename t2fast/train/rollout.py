"""Batched generation for rollouts and evaluation, and teacher-forced batches.

:func:`generate` runs a KV-cached decode loop over a left-padded batch: greedy or sampled
(temperature, top-k) with an explicit ``torch.Generator`` so rollouts are reproducible, every row
stopping at its end-of-sequence token. Whatever the model's linear layers are (original, an SVF
merged weight, per-row SVF mixtures through the kernels, a LoRA adapter), the loop is the same;
per-row mixtures are set by the caller (``before_chunk``) for each chunk of rows.

A :class:`Rollout` holds prompt + completion ids in one tensor, so the loss can recompute the
completion's log-probabilities with one teacher-forced forward (:func:`completion_logits`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

#: New tokens per task when generating (answers of the tiny world are short).
DEFAULT_MAX_NEW_TOKENS = {"arith": 8, "arith_chain": 8, "strings": 10, "strings_compose": 10,
                          "choice": 4, "choice_order": 4, "classify": 10}
FALLBACK_MAX_NEW_TOKENS = 16


def max_new_tokens_for(task_name: str | None, override: int | None = None) -> int:
    """``override`` when given, else the task's default answer budget."""
    if override is not None:
        return int(override)
    return DEFAULT_MAX_NEW_TOKENS.get(task_name or "", FALLBACK_MAX_NEW_TOKENS)


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
def _left_padding(tokenizer):
    old = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _special_ids(tokenizer, eos_token_id, pad_token_id):
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id=")
    if pad is None:
        pad = eos
    return int(eos), int(pad)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
          generator: torch.Generator | None) -> torch.Tensor:
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


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None) -> Rollout:
    """Generate completions of ``prompts`` in one batch (see the module docstring).

    Greedy when ``do_sample`` is False. Stops early once every row has produced end-of-sequence.
    """
    if not prompts:
        raise ValueError("generate got no prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = _special_ids(tokenizer, eos_token_id, pad_token_id)
    device = _device(model)
    with _left_padding(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ids = enc["input_ids"].to(device)
    am = enc["attention_mask"].to(device)
    B, P = ids.shape
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    past = out.past_key_values
    logits = out.logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    last_pos = pos[:, -1:]
    tokens, alive = [], []
    for step in range(max_new_tokens):
        tok = _pick(logits, do_sample, temperature, top_k, generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        alive.append(~finished)
        tokens.append(tok)
        finished = finished | (tok == eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype, device=device)], 1)
        last_pos = last_pos + 1
        out = model(input_ids=tok[:, None], attention_mask=am, position_ids=last_pos,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
    gen = torch.stack(tokens, 1)
    cmask = torch.stack(alive, 1)
    full_mask = torch.cat([enc["attention_mask"].to(device), cmask.long()], 1)
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(gen.cpu(), cmask.cpu())],
                                   skip_special_tokens=True)
    return Rollout(torch.cat([ids, gen], 1), full_mask, P, cmask.float(), texts)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, batch_size: int | None = None,
                   before_chunk: Callable[[int, int], None] | None = None, **kwargs) -> list[str]:
    """Completions (text) of many prompts, ``batch_size`` rows at a time.

    ``before_chunk(start, stop)`` is called before each chunk (e.g. to set that chunk's per-row
    expert mixtures); other keyword arguments go to :func:`generate`.
    """
    prompts = list(prompts)
    step = batch_size or max(1, len(prompts))
    out: list[str] = []
    for i in range(0, len(prompts), step):
        j = min(i + step, len(prompts))
        if before_chunk is not None:
            before_chunk(i, j)
        out.extend(generate(model, tokenizer, prompts[i:j], **kwargs).texts)
    return out


def teacher_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  device=None) -> Rollout:
    """A :class:`Rollout` whose completions are the reference ``answers`` followed by
    end-of-sequence (for SFT and for log-likelihoods of correct answers)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    eos, pad = _special_ids(tokenizer, eos_token_id, pad_token_id)
    with _left_padding(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ans = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    G = max(len(a) for a in ans)
    comp = torch.full((len(ans), G), pad, dtype=torch.long)
    cmask = torch.zeros(len(ans), G)
    for i, a in enumerate(ans):
        comp[i, :len(a)] = torch.tensor(a)
        cmask[i, :len(a)] = 1
    ids = torch.cat([enc["input_ids"], comp], 1)
    am = torch.cat([enc["attention_mask"], cmask.long()], 1)
    if device is not None:
        ids, am, cmask = ids.to(device), am.to(device), cmask.to(device)
    return Rollout(ids, am, enc["input_ids"].shape[1], cmask, list(answers))


def completion_logits(model, rollout: Rollout, group_size: int = 1) -> torch.Tensor:
    """Logits [B, G, V] predicting each completion token (teacher-forced).

    With ``group_size`` > 1, consecutive groups of that many rows must share their prompt (the
    samples of one prompt, see :func:`repeat_prompts`): the prompt is then run once per group and
    its KV cache repeated for the group's completions — the same numbers (up to float rounding)
    for about half the compute when answers are short. Gradients flow through both parts.
    """
    G = rollout.completion_ids.shape[1]
    B, P = rollout.num_rows, rollout.prompt_len
    pos = rollout.position_ids()
    if group_size <= 1 or B % group_size or P < 2:
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=pos, use_cache=False, logits_to_keep=G + 1)
        return out.logits[:, :-1].float()
    heads = slice(0, B, group_size)
    prompt_ids = rollout.input_ids[heads, :P]
    if not torch.equal(prompt_ids.repeat_interleave(group_size, 0), rollout.input_ids[:, :P]):
        raise ValueError(f"completion_logits(group_size={group_size}): rows of a group do not "
                         f"share their prompt")
    am = rollout.attention_mask
    # prompt minus its last token (whose logits predict the first completion token)
    out = model(input_ids=prompt_ids[:, :P - 1], attention_mask=am[heads, :P - 1],
                position_ids=pos[heads, :P - 1], use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)
    out = model(input_ids=rollout.input_ids[:, P - 1:-1], attention_mask=am[:, :-1],
                position_ids=pos[:, P - 1:-1], past_key_values=cache, use_cache=True)
    return out.logits.float()


def repeat_prompts(prompts: Sequence, n: int) -> list:
    """Each prompt ``n`` times in a row (samples of one prompt are adjacent)."""
    return [p for p in prompts for _ in range(n)]
