"""The two-pass engine: pass 1 chooses a mixture per prompt, pass 2 answers the whole batch with
per-row mixtures in one batched generation.

    engine = TwoPassEngine(handle, tokenizer)
    res = engine.run(prompts, PromptDispatch(handle, tokenizer))
    res.outputs, res.mixtures, res.pass1_s, res.pass2_s

Strategies (anything with ``select(prompts) -> (specs, labels)``):
    :class:`t2fast.adapt.prompt.PromptDispatch`         A. prompt-based, base weights in pass 1
    :class:`t2fast.adapt.classifier.ClassifierDispatch` B. classification expert in pass 1
    :class:`FixedMixture`                               C. a task-level α (e.g. from few-shot
                                                        CEM), uniform α, one expert, or the base
A strategy with a ``rewrite(prompts) -> prompts`` method (:class:`t2fast.adapt.restate.Restated`)
rewrites the prompts at the start of pass 1; its ``select`` and pass 2 then see the rewritten
prompts (``TwoPassResult.answered``).
Pass 2 sets one mixture per row (``SVFHandle.set_mixture(rows=[...])``): rows sharing one
mixture are served by merged weights, mixed batches by the SVF kernels.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..generation import check_batch_size, generate, prompt_list


class FixedMixture:
    """The same mixture for every prompt (no pass 1): an α from few-shot CEM, uniform α, an
    expert name, or None (the base model)."""

    def __init__(self, spec=None, name: str = "fixed"):
        self.spec = spec
        self.name = name

    def select(self, prompts: Sequence[str]):
        return [self.spec] * len(prompts), None


def uniform_alpha(num_experts: int) -> list[float]:
    """α = 1/K for every expert."""
    if num_experts < 1:
        raise ValueError("uniform_alpha needs at least one expert")
    return [1.0 / num_experts] * num_experts


@dataclass
class TwoPassResult:
    """Outputs of both passes: ``outputs`` (pass-2 completions), ``mixtures`` (spec per row),
    ``labels`` (pass-1 categories, None for fixed mixtures), ``pass1_s`` / ``pass2_s`` (wall
    seconds), ``pass2_paths`` (the path the hybrid dispatcher chose per chunk), ``answered``
    (the prompts pass 2 answered when the strategy rewrote them, else None)."""
    outputs: list[str]
    mixtures: list
    labels: list[str] | None
    pass1_s: float
    pass2_s: float
    pass2_paths: list[str] = field(default_factory=list)
    answered: list[str] | None = None

    @property
    def total_s(self) -> float:
        return self.pass1_s + self.pass2_s


class TwoPassEngine:
    """Runs pass 1 for the whole batch, then pass 2 with per-row experts in one batch
    (``batch_size`` rows per generation call; None: all rows at once). ``progress``: a bar on
    stderr (on a terminal only) counting the prompts through both passes."""

    def __init__(self, handle, tokenizer, *, max_new_tokens: int = 16,
                 batch_size: int | None = None, progress: bool = False):
        check_batch_size(batch_size, "TwoPassEngine")
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.progress = progress

    def run(self, prompts: Sequence[str], strategy, max_new_tokens: int | None = None
            ) -> TwoPassResult:
        prompts = prompt_list(prompts, "TwoPassEngine.run")
        if not prompts:
            raise ValueError("TwoPassEngine.run got no prompts")
        pass1 = f"pass 1 ({getattr(strategy, 'name', type(strategy).__name__)})"
        with tqdm(total=2 * len(prompts), desc=pass1, file=sys.stderr,
                  disable=None if self.progress else True, dynamic_ncols=True,
                  leave=False) as bar:
            t0 = time.perf_counter()
            rewrite = getattr(strategy, "rewrite", None)
            asked = list(rewrite(prompts)) if rewrite is not None else prompts
            if len(asked) != len(prompts):
                raise RuntimeError(f"strategy rewrote {len(prompts)} prompts into {len(asked)}")
            specs, labels = strategy.select(asked)
            t1 = time.perf_counter()
            if len(specs) != len(prompts):
                raise RuntimeError(f"strategy returned {len(specs)} mixtures for "
                                   f"{len(prompts)} prompts")
            bar.set_description("pass 2")
            bar.update(len(prompts))
            outputs, paths = self.answer(asked, specs, max_new_tokens, after_chunk=bar.update)
            t2 = time.perf_counter()
        return TwoPassResult(outputs, list(specs), labels, t1 - t0, t2 - t1, paths,
                             asked if rewrite is not None else None)

    @torch.no_grad()
    def answer(self, prompts: Sequence[str], specs: Sequence, max_new_tokens: int | None = None,
               after_chunk: Callable[[int], object] | None = None
               ) -> tuple[list[str], list[str]]:
        """Pass 2: greedy answers with one mixture per row (``after_chunk(rows)`` after each
        generation call)."""
        self.handle.set_trainable_z(None)
        step = self.batch_size or len(prompts)
        out, paths = [], []
        try:
            for i in range(0, len(prompts), step):
                j = min(len(prompts), i + step)
                paths.append(self.handle.set_mixture(rows=list(specs[i:j])))
                out.extend(generate(self.handle.model, self.tokenizer, prompts[i:j],
                                    max_new_tokens=max_new_tokens or self.max_new_tokens).texts)
                if after_chunk is not None:
                    after_chunk(j - i)
        finally:
            self.handle.set_mixture(None)
        return out, paths
