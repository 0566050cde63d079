"""Two-pass adaptation inside the server (``t2_adapt``).

Pass 1 asks the engine itself to classify the request's prompt — with the base weights
(``"prompt"``, strategy A) or with the classification expert (``"classifier"``, strategy B) —,
parses the answer with :func:`t2fast.adapt.parse_category`, and pass 2 is the request itself,
served with the chosen category's expert (the base model for "other"). Pass-1 requests of
concurrent HTTP requests are in flight together, so vLLM's scheduler batches them like any
other requests. The chosen expert and the pass-1 time are reported in response headers
(:data:`HEADER_EXPERT`, :data:`HEADER_PASS1_MS`).

With restatement (``t2fast serve --restate``, the tiny world's template only), pass 1 first has
the base weights restate the request's question (:meth:`Adapter.restate`: the first line of
their answer to ``step by step: QUESTION``, as :class:`t2fast.adapt.Restated` does); the
request then asks the restated question, for the choice of pass 1 and in pass 2
(:data:`HEADER_RESTATED`). A question the model writes no first step for is asked as sent.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..adapt import PROMPT_TEMPLATES, parse_category, restatement_prompt
from ..adapt.restate import RESTATE_MAX_TOKENS
from ..mixtures import EXPERT_FIELD, REQUEST_KEY
from ..tasks import extract_question, format_prompt
from ..tasks.steps import STEP_MARK, first_step
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
#: The question the request asked after restatement (``none``: asked as sent).
HEADER_RESTATED = "x-t2-restated"
#: How long the restatement took.
HEADER_RESTATE_MS = "x-t2-restate-ms"
PASS1_MAX_TOKENS = 10


def restated_text(text: str, question: str) -> str:
    """``text`` (a request's prompt) asking ``question`` instead: in the tiny world's template
    where ``text`` was in it, else bare."""
    return question if extract_question(text) == text.strip() else format_prompt(question)


@dataclass
class Restatement:
    """Outcome of the restatement: the restated question (None: none written), its time."""
    question: str | None
    ms: float


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
        template: a key of :data:`t2fast.adapt.PROMPT_TEMPLATES`.
        classifier: the classification expert's name (needed for ``"classifier"``).
        restate: restate each adapted request's question first (:meth:`restate`; ``"tiny"``
            template only).
    """

    def __init__(self, engine_client, template: str = "tiny", classifier: str | None = None,
                 restate: bool = False):
        if template not in PROMPT_TEMPLATES:
            raise ValueError(f"t2fast serve: adapt template must be one "
                             f"of {sorted(PROMPT_TEMPLATES)}, got {template!r}")
        if restate and template != "tiny":
            raise ValueError("t2fast serve: restatement needs the 'tiny' adapt template")
        self.engine_client = engine_client
        self.prompt_fn = PROMPT_TEMPLATES[template]
        self.classifier = classifier
        self.restates = restate

    async def _greedy(self, purpose: str, prompt: str, max_tokens: int, extra_args=None,
                      stop: str | None = None) -> str:
        """The engine's greedy text for ``prompt`` (an internal request, batched with the
        others in flight), ending with ``stop`` where it writes it.

        Raises:
            T2HTTPError (400) when the engine refuses the request (a question that fits the
            model alone but not inside the ``purpose`` template, ...).
        """
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args,
                                stop=stop, include_stop_str_in_output=True)
        final = None
        try:
            async for out in self.engine_client.generate(prompt, params,
                                                         f"t2-pass1-{uuid.uuid4().hex}"):
                final = out
        except VLLMClientError as exc:
            raise T2HTTPError(f"{ADAPT_KEY}: the engine refused pass 1's {purpose} prompt (the "
                              f"request's question inside the {purpose} template): {exc}",
                              param=ADAPT_KEY) from None
        return final.outputs[0].text if final is not None and final.outputs else ""

    async def restate(self, text: str) -> Restatement:
        """The question ``text`` restates to: the first step the base weights write for
        ``step by step: QUESTION`` (:func:`t2fast.adapt.restatement_prompt`), or None. The
        generation stops at the step's separator: greedy decoding writes the same first step
        as the full answer of :func:`t2fast.adapt.restated_questions`, without the rest."""
        t0 = time.perf_counter()
        answer = await self._greedy("restatement", restatement_prompt(text), RESTATE_MAX_TOKENS,
                                    stop=STEP_MARK)
        return Restatement(first_step(answer), (time.perf_counter() - t0) * 1e3)

    def categories(self, loaded: list[str]) -> list[str]:
        """Pass-2 experts: every loaded expert but the classification expert."""
        return [n for n in loaded if n != self.classifier]

    async def choose(self, mode: str, text: str, loaded: list[str]) -> Choice:
        """Pass 1 for ``text``; ``mode`` is ``"prompt"`` or ``"classifier"``."""
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
        t0 = time.perf_counter()
        answer = await self._greedy("classification", self.prompt_fn(text, labels),
                                    PASS1_MAX_TOKENS, extra)
        ms = (time.perf_counter() - t0) * 1e3
        label = parse_category(answer, labels)
        return Choice(label, label if label in labels else None, ms)
