"""Two-pass adaptation inside the server (``t2_adapt``).

Pass 1 asks the engine itself to classify the request's prompt — with the base weights
(``"prompt"``, strategy A) or with the classification expert (``"classifier"``, strategy B) —,
parses the answer with :func:`t2fast.adapt.parse_category`, and pass 2 is the request itself,
served with the chosen category's expert (the base model for "other"). Pass-1 requests of
concurrent HTTP requests are in flight together, so vLLM's scheduler batches them like any
other requests. The chosen expert and the pass-1 time are reported in response headers
(:data:`HEADER_EXPERT`, :data:`HEADER_PASS1_MS`).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..adapt import paper_style_prompt, parse_category, tiny_world_prompt
from ..mixtures import EXPERT_FIELD, REQUEST_KEY
from .translate import ADAPT_KEY, T2HTTPError

HEADER_ADAPT = "x-t2-adapt"
HEADER_EXPERT = "x-t2-expert"
HEADER_PASS1_MS = "x-t2-pass1-ms"
HEADER_LABEL = "x-t2-pass1-label"
HEADER_ALPHA = "x-t2-alpha"
#: The mixture a response was served with, in normal form (``{"arith": 1.0}``) or ``base``.
HEADER_MIXTURE = "x-t2-mixture"
#: Why the server's default ``t2_adapt`` was not run for a request.
HEADER_ADAPT_SKIPPED = "x-t2-adapt-skipped"
#: How pass 1 phrases the question: the tiny world's template, or the paper's for chat models.
TEMPLATES = {"tiny": tiny_world_prompt, "paper": paper_style_prompt}
PASS1_MAX_TOKENS = 10


@dataclass
class Choice:
    """Outcome of pass 1: the label the model gave, the expert it maps to (None: base)."""
    label: str
    expert: str | None
    pass1_ms: float

    def headers(self, mode: str) -> dict[str, str]:
        return {HEADER_ADAPT: mode, HEADER_EXPERT: self.expert or "base",
                HEADER_LABEL: self.label, HEADER_PASS1_MS: f"{self.pass1_ms:.1f}"}


class Adapter:
    """Runs pass 1 for one request.

    Args:
        engine_client: vLLM's ``EngineClient``.
        template: a key of :data:`TEMPLATES`.
        classifier: the classification expert's name (needed for ``"classifier"``).
    """

    def __init__(self, engine_client, template: str = "tiny", classifier: str | None = None):
        if template not in TEMPLATES:
            raise ValueError(f"t2fast serve: adapt template must be one of {sorted(TEMPLATES)}, "
                             f"got {template!r}")
        self.engine_client = engine_client
        self.prompt_fn = TEMPLATES[template]
        self.classifier = classifier

    def categories(self, loaded: list[str]) -> list[str]:
        """Pass-2 experts: every loaded expert but the classification expert."""
        return [n for n in loaded if n != self.classifier]

    async def choose(self, mode: str, text: str, loaded: list[str]) -> Choice:
        """Pass 1 for ``text``; ``mode`` is ``"prompt"`` or ``"classifier"``."""
        from vllm import SamplingParams

        if mode == "classifier":
            if self.classifier is None:
                raise T2HTTPError(f"{ADAPT_KEY}='classifier' needs a classification expert; "
                                  f"start the server with --classifier", param=ADAPT_KEY)
            if self.classifier not in loaded:
                raise T2HTTPError(f"the classification expert {self.classifier!r} is not "
                                  f"loaded", param=ADAPT_KEY)
        labels = self.categories(loaded)
        if not labels:
            raise T2HTTPError(f"{ADAPT_KEY} needs at least one loaded expert to choose from",
                              param=ADAPT_KEY)
        extra = {REQUEST_KEY: {EXPERT_FIELD: self.classifier}} if mode == "classifier" else None
        params = SamplingParams(temperature=0.0, max_tokens=PASS1_MAX_TOKENS, extra_args=extra)
        t0 = time.perf_counter()
        final = None
        async for out in self.engine_client.generate(self.prompt_fn(text, labels), params,
                                                     f"t2-pass1-{uuid.uuid4().hex}"):
            final = out
        ms = (time.perf_counter() - t0) * 1e3
        answer = final.outputs[0].text if final is not None and final.outputs else ""
        label = parse_category(answer, labels)
        return Choice(label, label if label in labels else None, ms)
