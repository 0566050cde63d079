"""Rollouts for training: answer budgets per task, teacher-forced batches and the logits of a
rollout's completion.

Generation itself lives in :mod:`t2fast.generation` (:func:`generate`, :func:`generate_texts`,
:class:`Rollout`, imported here for the trainer). A :class:`Rollout` holds prompt + completion
ids in one tensor, so the loss can recompute the completion's log-probabilities with one
teacher-forced forward (:func:`completion_logits`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..generation import (Rollout, cache_field, check_positions, generate, generate_texts,
                          left_padding, special_ids)

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "FALLBACK_MAX_NEW_TOKENS", "Rollout", "completion_logits",
           "generate", "generate_texts", "max_new_tokens_for", "repeat_prompts", "teacher_batch"]

#: New tokens per task when generating (answers of the tiny world are short).
DEFAULT_MAX_NEW_TOKENS = {"arith": 8, "arith_chain": 8, "strings": 10, "strings_compose": 10,
                          "choice": 4, "choice_order": 4, "classify": 10,
                          # transfer families: their training family's budget
                          "arith_words": 8, "strings_words": 10, "choice_words": 4,
                          "classify_transfer": 10,
                          # two-step families restate the question first
                          "arith_steps": 20, "strings_steps": 26, "choice_steps": 52}
#: New tokens per JSONL data set kind (``KIND:FILE`` tasks): worked solutions and code are long.
JSONL_MAX_NEW_TOKENS = {"gsm8k": 512, "arc": 32, "mbpp": 512, "humaneval": 512}
FALLBACK_MAX_NEW_TOKENS = 16


def max_new_tokens_for(task_name: str | None, override: int | None = None) -> int:
    """``override`` when given, else the task's default answer budget: a JSONL data set's by
    its kind, named by its task name (``KIND:FILE``) or by the task's own ``name`` (``KIND``)."""
    if override is not None:
        return int(override)
    from ..tasks.registry import jsonl_spec

    spec = jsonl_spec(task_name)
    kind = spec[0] if spec is not None else task_name
    if kind in JSONL_MAX_NEW_TOKENS:
        return JSONL_MAX_NEW_TOKENS[kind]
    return DEFAULT_MAX_NEW_TOKENS.get(task_name or "", FALLBACK_MAX_NEW_TOKENS)


def teacher_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  device=None) -> Rollout:
    """A :class:`Rollout` whose completions are the reference ``answers`` followed by
    end-of-sequence (for SFT and for log-likelihoods of correct answers)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    eos, pad = special_ids(tokenizer, eos_token_id, pad_token_id)
    with left_padding(tokenizer):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ans = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    G = max(len(a) for a in ans)
    comp = torch.full((len(ans), G), pad, dtype=torch.long)
    cmask = torch.zeros(len(ans), G, dtype=torch.float32)
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
    check_positions(model, rollout.attention_mask, "row")
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
    name = cache_field(model)
    cache = getattr(out, name)
    cache.batch_repeat_interleave(group_size)
    out = model(input_ids=rollout.input_ids[:, P - 1:-1], attention_mask=am[:, :-1],
                position_ids=pos[:, P - 1:-1], use_cache=True, **{name: cache})
    return out.logits.float()


def repeat_prompts(prompts: Sequence, n: int) -> list:
    """Each prompt ``n`` times in a row (samples of one prompt are adjacent)."""
    return [p for p in prompts for _ in range(n)]
