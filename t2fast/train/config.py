"""Configuration of an SVF (or LoRA baseline) training run, with validation.

Every field has a default that follows the paper's recipe where it gives one (AdamW, lr 2e-3
with cosine decay, gradient clipping, reward ±1, KL to the base model) scaled down to what a
small CPU can run. :meth:`TrainConfig.validate` turns bad values into ``ValueError`` messages
that name the field and the accepted values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SVFConfig, SVFConfigError
from ..targets import PRESETS, layers_to_json, normalize_layers

METHODS = ("svf", "lora")
OBJECTIVES = ("rl", "sft")
PARAMETERIZATIONS = ("plain", "official")
REDUCTIONS = ("sum", "mean")
BASELINES = ("none", "mean")


class ConfigError(ValueError):
    """A training or adaptation configuration is invalid."""


def checkpoint_progress(path) -> tuple[int, int] | None:
    """``(step, steps)`` of a training checkpoint, ``step == steps`` once its run finished
    (all its steps, or stopped early); None when the file is no readable checkpoint."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = json.loads(state["config_json"])
        step, steps, patience = int(state["step"]), int(config["steps"]), config["patience"]
        stopped = patience is not None and int(state["evals_since_best"]) >= int(patience)
    except Exception:  # noqa: BLE001 - any unreadable file is named as such
        return None
    return (steps, steps) if stopped else (min(step, steps), steps)


def known_fields(cls, d: dict) -> dict:
    """A copy of ``d``, whose keys must all be fields of the dataclass ``cls``
    (:class:`ConfigError` names the others)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
    return dict(d)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved into the expert file's metadata).

    Data / task
        task: task family to train on (``t2fast.tasks.get_task`` name, e.g. ``"arith"``).
        train_n: number of training examples drawn from the task's train split (None: default).
        eval_split / eval_n: split and size used for validation (best checkpoint, early stop).
    Method
        method: ``"svf"`` (train z vectors) or ``"lora"`` (PEFT LoRA baseline).
        objective: ``"rl"`` (REINFORCE + KL) or ``"sft"`` (next-token loss on reference answers).
        parameterization: ``"plain"`` (z starts at 1, W' = U diag(σ⊙z) Vᵀ) or ``"official"``
            (z = sigmoid(p), W' rescaled by Σσ / Σ(σ⊙z), as in the authors' code).
        official_init: initial logit p of the official parameterization (uniform p, so the
            rescaled z starts at exactly 1 whatever the value).
        targets / layers: adapted matrices (see :func:`t2fast.targets.resolve_targets`); with
            ``backend`` and ``cache_dir`` they make the run's :class:`t2fast.config.SVFConfig`
            (:meth:`TrainConfig.svf_config`).
        lora_rank / lora_alpha / lora_dropout: LoRA baseline settings (targets as above).
    Optimisation
        steps, batch_size (prompts per step), samples_per_prompt, lr, min_lr_ratio (cosine decay
        ends at lr·min_lr_ratio), warmup_steps, weight_decay, betas, grad_clip (max global norm;
        0 disables), kl_coef (λ of λ·KL(π_W' ‖ π_W), the full-vocabulary KL to the base model
        averaged over answer tokens; default 0.05, on; 0 turns the penalty off),
        unparsable_penalty (reward of an unparsable answer instead of -1, e.g. -0.1),
        temperature / top_k (rollout sampling; log-probabilities and KL are taken at the same
        temperature, so the gradient is on-policy; top_k > 0 truncates the sampling distribution
        and makes it slightly off-policy), max_new_tokens (None: per-task default),
        logprob_reduction (``"sum"`` over answer tokens as in log π(ŷ|x), or ``"mean"``),
        baseline (``"none"``: plain REINFORCE as in the paper, or ``"mean"``: subtract the mean
        reward of the prompt's samples), log_kl (compute and log the KL even when kl_coef is 0;
        it costs a forward pass of the base model per step, which is otherwise skipped).
    Schedule / bookkeeping
        eval_every (steps; 0: only at the start and the end), patience (evaluations without
        improvement before early stopping; None: never), seed, out (expert file for SVF, folder
        for LoRA), log (JSONL path; default ``<out>.log.jsonl``), checkpoint (resumable state;
        default ``<out>.state.pt``), resume, tensorboard (folder, used when tensorboard is
        installed), progress, backend (SVF kernels backend for rollouts; "torch" on CPU),
        threads (torch threads; None leaves it), cache_dir (SVD cache; False disables).
    """

    task: str = "arith"
    method: str = "svf"
    objective: str = "rl"
    parameterization: str = "plain"
    official_init: float = 0.1
    targets: Any = "all"
    layers: Any = None
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    steps: int = 200
    batch_size: int = 32
    samples_per_prompt: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    kl_coef: float = 0.05
    unparsable_penalty: float | None = None
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    logprob_reduction: str = "sum"
    baseline: str = "none"
    log_kl: bool = False

    train_n: int | None = None
    eval_split: str = "validation"
    eval_n: int = 128
    eval_every: int = 25
    eval_batch_size: int = 128
    patience: int | None = None
    seed: int = 0

    out: str | None = None
    log: str | None = None
    checkpoint: str | None = None
    resume: bool = False
    tensorboard: str | None = None
    progress: bool = True
    backend: str = "torch"
    threads: int | None = None
    cache_dir: Any = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------
    def validate(self, check_task: bool = True) -> "TrainConfig":
        """Raise :class:`ConfigError` on the first invalid field; return self.

        ``check_task=False`` skips the task-name check (a custom :class:`t2fast.tasks.Task`
        object is given to the trainer instead)."""
        def bad(name, why):
            raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        def choice(name, options):
            if getattr(self, name) not in options:
                bad(name, f"expected one of {', '.join(map(repr, options))}")

        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                bad(name, f"expected an integer >= {0 if allow_zero else 1}")

        def finite(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "expected a finite number")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                bad(name, f"expected a value {'>' if lo_open else '>='} {lo}")
            if hi is not None and v > hi:
                bad(name, f"expected a value <= {hi}")

        from ..tasks.registry import JSONL_KINDS, is_task_name, task_names
        if check_task and not is_task_name(self.task):
            bad("task", f"unknown task; known tasks: {', '.join(task_names())}, or KIND:FILE "
                        f"or KIND@SPLIT:FILE (a JSONL data set; KIND: {', '.join(JSONL_KINDS)})")
        choice("method", METHODS)
        choice("objective", OBJECTIVES)
        choice("parameterization", PARAMETERIZATIONS)
        choice("logprob_reduction", REDUCTIONS)
        choice("baseline", BASELINES)
        if self.method == "lora" and self.parameterization != "plain":
            bad("parameterization", "only applies to method='svf' (leave it 'plain' for LoRA)")
        if isinstance(self.targets, str):   # a preset, or one name checked against the model
            if not self.targets.strip():
                bad("targets", f"expected {', '.join(PRESETS)}, a module short name "
                               f"(e.g. 'down_proj', 'fc1') or a list of names / glob patterns")
        elif not (isinstance(self.targets, (list, tuple)) and self.targets
                  and all(isinstance(t, str) for t in self.targets)):
            bad("targets", "expected a preset name or a non-empty list of module names")
        for name in ("steps", "batch_size", "samples_per_prompt", "eval_n", "eval_batch_size",
                     "lora_rank"):
            positive_int(name)
        for name in ("warmup_steps", "eval_every", "seed"):
            positive_int(name, allow_zero=True)
        if self.warmup_steps >= self.steps and self.warmup_steps:
            bad("warmup_steps", f"must be smaller than steps ({self.steps})")
        finite("lr", 0.0, lo_open=True)
        finite("min_lr_ratio", 0.0, 1.0)
        finite("weight_decay", 0.0)
        finite("grad_clip", 0.0)
        finite("kl_coef", 0.0)
        finite("temperature", 0.0, lo_open=True)
        finite("official_init")
        finite("lora_alpha", 0.0, lo_open=True)
        finite("lora_dropout", 0.0, 1.0)
        positive_int("top_k", allow_zero=True)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas)):
            bad("betas", "expected two numbers in [0, 1)")
        if self.unparsable_penalty is not None:
            finite("unparsable_penalty", -1.0, 1.0)
        if self.max_new_tokens is not None:
            positive_int("max_new_tokens")
        if self.train_n is not None:
            positive_int("train_n")
        if self.patience is not None:
            positive_int("patience")
        if self.threads is not None:
            positive_int("threads")
        from ..tasks import SPLITS
        choice("eval_split", SPLITS)
        try:
            self.svf_config()
        except SVFConfigError as exc:
            bad(exc.field, exc.why)
        if self.objective == "rl" and self.baseline == "mean" and self.samples_per_prompt < 2:
            bad("baseline", "'mean' subtracts the mean reward of a prompt's samples: needs "
                            "samples_per_prompt >= 2")
        if self.resume and not (self.checkpoint or self.out):
            bad("resume", "needs a checkpoint path (or out, from which it is derived)")
        if self.out is not None and self.method == "svf" and not str(self.out).endswith(
                ".safetensors"):
            bad("out", "an SVF expert is written as a .safetensors file")
        if self.out is not None and self.method == "svf":
            from ..mixtures import check_expert_name
            try:        # the file name is the expert's name: refuse a bad one before training
                check_expert_name(self.expert_name, "the expert name")
            except ValueError as exc:
                bad("out", str(exc))
        return self

    # ------------------------------------------------------------------------------------
    @property
    def expert_name(self) -> str | None:
        """The name the expert is saved under: ``out``'s file name less ``.safetensors``
        (``arith_kl0.2.safetensors`` → ``arith_kl0.2``), a LoRA folder's name as it is."""
        if self.out is None:
            return None
        name = Path(self.out).name
        return name[:-len(".safetensors")] if name.endswith(".safetensors") else name

    @property
    def log_path(self) -> Path | None:
        """``log``, else ``<out>.log.jsonl`` beside ``out`` (a folder's too)."""
        if self.log:
            return Path(self.log)
        return Path(str(Path(self.out)) + ".log.jsonl") if self.out else None

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint``, else ``<out>.state.pt`` beside ``out`` (a folder's too)."""
        if self.checkpoint:
            return Path(self.checkpoint)
        return Path(str(Path(self.out)) + ".state.pt") if self.out else None

    def check_files(self) -> "TrainConfig":
        """Raise :class:`ConfigError` when the run's files would destroy each other or an
        earlier run: ``out``, the log and the checkpoint must be three paths; with ``resume``
        the checkpoint must exist, and without it none of an unfinished run may (a new run
        would start that run's log and expert anew: continue it with ``resume``, or delete
        it; a finished run's, kept, is replaced).
        Returns self."""
        files = {"out": self.out, "log": self.log_path, "checkpoint": self.checkpoint_path}
        seen = {}
        for name, path in files.items():
            if path is None:
                continue
            key = os.path.normcase(Path(path).expanduser().resolve())
            if key in seen:
                raise ConfigError(f"TrainConfig.{name}={str(path)!r}: the same file as "
                                  f"{seen[key]}; the run writes each of out, log and "
                                  f"checkpoint, so they must differ")
            seen[key] = name
        ckpt = self.checkpoint_path
        if ckpt is None:
            return self
        if self.resume and not ckpt.exists():
            raise ConfigError(f"TrainConfig.resume=True: there is no checkpoint at "
                              f"{str(ckpt)!r}")
        if not self.resume and ckpt.exists():
            progress = checkpoint_progress(ckpt)
            if progress is None or progress[0] < progress[1]:
                what = "that t2fast cannot read" if progress is None else \
                    f"(step {progress[0]} of {progress[1]})"
                into = f" into {self.out!r}" if self.out else ""
                raise ConfigError(f"TrainConfig.resume=False: {str(ckpt)!r} holds the "
                                  f"checkpoint of an unfinished run{into} {what}, which a new "
                                  f"run would restart from scratch (its log and expert too); "
                                  f"continue it with resume (--resume), or delete the "
                                  f"checkpoint to start anew")
        return self

    def svf_config(self) -> SVFConfig:
        """The :class:`t2fast.config.SVFConfig` of the adapted model (targets, layers, backend,
        cache_dir); raises :class:`t2fast.config.SVFConfigError` on a bad one."""
        return SVFConfig(targets=self.targets, layers=self.layers, backend=self.backend,
                         cache_dir=self.cache_dir)

    def to_dict(self) -> dict:
        """The JSON form; ``layers`` as :func:`t2fast.targets.layers_to_json` writes it (a range
        ``(a, b)`` is ``{"start": a, "stop": b}``), so :meth:`from_dict` reads the same back."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        d["layers"] = layers_to_json(normalize_layers(self.layers, "TrainConfig.layers"))
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = known_fields(cls, d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if "layers" in d:
            d["layers"] = normalize_layers(d["layers"], "TrainConfig.layers")
        return cls(**d)
