"""Settings of the HTTP layer of ``t2fast serve``, carried in vLLM's own config.

They travel as ``additional_config["t2fast_serve"]`` next to the engine's
``additional_config["t2fast"]`` (:class:`t2fast.vllm.T2Config`), so that ``vllm serve
--additional-config '{"t2fast": {...}, "t2fast_serve": {...}}'`` with ``VLLM_PLUGINS=t2fast``
and ``t2fast serve`` run the same server.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

SERVE_KEY = "t2fast_serve"


@dataclass
class ServeConfig:
    """What the server does with t2fast requests.

    Attributes:
        adapt: ``t2_adapt`` of requests that name no mixture: ``"none"`` (the base model),
            ``"prompt"`` or ``"classifier"``.
        classifier: name of the classification expert (pass 1 of ``"classifier"``); it is
            loaded like any expert but never chosen for pass 2.
        adapt_template: how pass 1 asks for the category: ``"tiny"`` (the bundled tiny model's
            ``Q: classify: ...``) or ``"paper"`` (the paper's prompt, for chat models).
        allow_runtime_loading: expose ``POST`` / ``DELETE /v1/t2/experts`` (off by default,
            like vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: they read files named by clients).
        runtime_loading_root: the folder those files must resolve inside (symlinks resolved),
            like vLLM's ``--allowed-local-media-path``; required with
            ``allow_runtime_loading``.
        named_experts: ``{name: file}`` loaded at start-up under the given names.
        profiles: ``{name: file}`` of mixture profiles (:mod:`t2fast.serve.profiles`) served
            as ``t2_adapt="profile:NAME"``.
        restate: pass 1 first restates each adapted request's question with the base weights
            and the request asks the restated one (:mod:`t2fast.serve.adapt`; ``"tiny"``
            template only).
    """
    adapt: str = "none"
    classifier: str | None = None
    adapt_template: str = "tiny"
    allow_runtime_loading: bool = False
    runtime_loading_root: str | None = None
    named_experts: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    restate: bool = False

    def __post_init__(self):
        from ..mixtures import profile_name
        from ..adapt import PROMPT_TEMPLATES
        from .translate import ADAPT_MODES

        if self.adapt not in ADAPT_MODES and profile_name(self.adapt) is None:
            raise ValueError(f"t2fast serve: adapt must be one of {ADAPT_MODES}, got "
                             f"{self.adapt!r}")
        if self.adapt == "classifier" and not self.classifier:
            raise ValueError("t2fast serve: adapt='classifier' needs a classifier expert")
        if self.allow_runtime_loading:
            root = self.runtime_loading_root
            if not root:
                raise ValueError("t2fast serve: run-time loading needs a root folder the "
                                 "loaded files must lie in (--runtime-loading-root DIR)")
            if not os.path.isdir(root):
                raise ValueError(f"t2fast serve: the run-time loading root {root!r} is not a "
                                 f"folder")
        elif self.runtime_loading_root is not None:
            raise ValueError("t2fast serve: --runtime-loading-root is given without "
                             "--allow-runtime-loading")
        if self.adapt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"t2fast serve: adapt_template must be one "
                             f"of {sorted(PROMPT_TEMPLATES)}, got {self.adapt_template!r}")
        if self.restate and self.adapt_template != "tiny":
            raise ValueError("t2fast serve: --restate asks the tiny world's 'step by step:' "
                             f"question; it needs --adapt-template tiny, not "
                             f"{self.adapt_template!r}")

    @classmethod
    def from_dict(cls, d) -> "ServeConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"t2fast serve: unknown settings {unknown}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ServeConfig":
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(extra.get(SERVE_KEY) if isinstance(extra, dict) else None)

    def to_dict(self) -> dict:
        return asdict(self)
