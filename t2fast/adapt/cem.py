"""Strategy C — few-shot adaptation: the cross-entropy method (CEM) over mixture weights α.

For a task with a few examples, search α ∈ R^K (``per_layer=False``, one weight per expert) or
α ∈ R^{L×K} (``per_layer=True``, one per layer and expert): sample a population from a diagonal
Gaussian, clamp and optionally normalize each member, score every member on the few-shot set,
refit mean and std to the elites, repeat. The best member seen is kept.

Two objectives (``CEMConfig.objective``):

* ``"likelihood"`` (default): the mean per-token log-likelihood of the correct answers,
  teacher-forced. It is continuous, so a handful of shots still ranks members, and it costs one
  forward pass per member instead of a generation.
* ``"accuracy"``: the greedy accuracy on the shots, ties broken by that likelihood (the
  original objective). On 5 shots it takes six values and 320 members are ranked by it: the
  winners scored 0.8–1.0 on their shots and as low as 0.26 on the test questions.

``results/README.md`` measures the steps from the original search to the default one at a
time: with 5 shots either objective leaves four of nine held-out rows significantly below the
base model; 20 shots leave one; residual α none.

Two spaces (``CEMConfig.space``) for α:

* ``"residual"`` (default): ``z' = 1 + Σ_k α_k (z_k − 1)``, i.e. the base model's weight is
  ``1 − Σ_k α_k``. α = 0 is the base model, a unit vector one expert, uniform 1/K the uniform
  mixture; whatever Σ α is, the singular values move only as far as the experts move them.
* ``"absolute"``: ``z' = Σ_k α_k z_k`` (the paper's form). Away from Σ α = 1 it scales every
  singular value of every adapted matrix by about Σ α, a change no expert learnt. On 5 shots the
  search picked members with Σ α from 0.67 to 2.77, and four of its nine held-out rows were 12
  to 17 points below the base model (``results/README.md``).

With ``keep_base`` (default) the search starts at the base model (residual α = 0 when
``init_mean`` is None), and :func:`fewshot_cem` returns the best member only when it beats the
base model by the objective *and* is at least as accurate under greedy decoding on shots the
search never saw; otherwise the base model: a few shots that show no gain leave it alone. By
default the last half of the shots (``check_shots``) take no part in the search and alone make
that decision: the search's best is chosen on its own shots, so it tends to look better there
than it is. ``check_shots=0`` lets the searched shots decide (the earlier default);
``results/README.md`` measures both, one row per seed, on every unseen family.

:attr:`CEMResult.spec` is the mixture to serve (``set_mixture``, ``FixedMixture``, a profile):
``{"base": 1 − Σα, name: α_k ...}`` for residual α, the K weights for absolute α, or None
(the base model).

:class:`FewShotScorer` evaluates a whole population in **one batched call**: the batch holds
population × examples rows and every row carries its own α (``SVFHandle.set_mixture`` with
``rows=``), which the SVF kernels serve without merging a weight per member.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generation import generate
from ..mixtures import MixtureBounds
from ..train.config import ConfigError, known_fields
from ..train.objectives import token_logprobs
from ..train.rollout import completion_logits, max_new_tokens_for, teacher_batch

#: α, its mean and spread are float32 whatever torch's default dtype is.
F32 = torch.float32


#: The objectives :class:`FewShotScorer` can rank members by.
OBJECTIVES = ("likelihood", "accuracy")
#: The spaces α can live in (module docstring).
SPACES = ("residual", "absolute")


@dataclass
class CEMConfig:
    """Settings of the search.

    population: members per generation; elite_ratio: share kept to refit the Gaussian;
    iterations: generations (the paper allows up to 100); objective: ``"likelihood"`` or
    ``"accuracy"``, and space: ``"residual"`` or ``"absolute"`` (module docstring); keep_base: start at α = 0 and return it unless the search
    beats it on the shots (:func:`fewshot_cem`); init_mean: None (α = 0 with ``keep_base``, else
    uniform 1/K), a number or K numbers (e.g. the mixture a dispatcher picked, to search around
    it); init_std: initial standard deviation; min_std: floor of the std after each
    refit; clamp: (lo, hi) bounds applied to every sample, or None; normalize: divide α by its
    sum over experts (per layer when per-layer; a sum near 0 falls back to Σ|α|); per_layer: α of
    shape [L, K]; keep_best: return the best member ever scored (else the final mean);
    include_mean: member 0 of each generation is the current mean; patience: stop after this
    many generations without a better best (None: never); check_shots: with ``keep_base``, the
    last ``check_shots`` examples take no part in the search and alone decide whether its best
    member replaces the base model (None: half of the shots, rounded down, see
    :meth:`held_out`; 0: the search's own shots decide); seed.
    """

    population: int = 16
    elite_ratio: float = 0.25
    iterations: int = 20
    objective: str = "likelihood"
    space: str = "residual"
    keep_base: bool = True
    init_mean: float | Sequence[float] | None = None
    init_std: float = 0.3
    min_std: float = 0.02
    clamp: tuple[float, float] | None = (-1.0, 2.0)
    normalize: bool = False
    per_layer: bool = False
    keep_best: bool = True
    include_mean: bool = True
    patience: int | None = None
    check_shots: int | None = None
    seed: int = 0

    def validate(self) -> "CEMConfig":
        def bad(name, why):
            raise ConfigError(f"CEMConfig.{name}={getattr(self, name)!r}: {why}")
        for name in ("population", "iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "expected an integer >= 1")
        if self.population < 2:
            bad("population", "expected at least 2 members")
        if self.objective not in OBJECTIVES:
            bad("objective", f"expected one of {OBJECTIVES}")
        if self.space not in SPACES:
            bad("space", f"expected one of {SPACES}")
        if self.keep_base and self.space != "residual":
            bad("keep_base", "the base model is a residual α (space='residual'); expected "
                             "keep_base=False with space='absolute'")
        if not (0 < self.elite_ratio <= 1):
            bad("elite_ratio", "expected a value in (0, 1]")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            bad("init_std", "expected a positive number")
        if not (math.isfinite(self.min_std) and self.min_std >= 0):
            bad("min_std", "expected a number >= 0")
        if self.clamp is not None:
            if len(self.clamp) != 2 or not all(math.isfinite(v) for v in self.clamp) or \
                    self.clamp[0] >= self.clamp[1]:
                bad("clamp", "expected (lo, hi) with lo < hi, or None")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            bad("patience", "expected an integer >= 1 or None")
        if self.check_shots is not None and (not isinstance(self.check_shots, int) or
                                             isinstance(self.check_shots, bool) or
                                             self.check_shots < 0):
            bad("check_shots", "expected an integer >= 0, or None (half of the shots)")
        if self.check_shots and not self.keep_base:
            bad("check_shots", "held-out shots decide between the search and the base model; "
                               "expected keep_base=True")
        return self

    def to_dict(self) -> dict:
        """The JSON form (``clamp`` and a sequence ``init_mean`` as lists); :meth:`from_dict`
        reads it back equal."""
        d = dataclasses.asdict(self)
        for name in ("clamp", "init_mean"):
            if isinstance(d[name], (tuple, list)):
                d[name] = [float(v) for v in d[name]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CEMConfig":
        d = known_fields(cls, d)
        if d.get("clamp") is not None:
            d["clamp"] = tuple(d["clamp"])
        return cls(**d)

    def held_out(self, shots: int) -> int:
        """How many of ``shots`` few-shot examples are held out of the search to decide
        between its best and the base model: ``check_shots``, or when it is None half of them
        (``shots // 2``) with ``keep_base`` and none without."""
        if self.check_shots is not None:
            return self.check_shots
        return shots // 2 if self.keep_base else 0

    @property
    def num_elites(self) -> int:
        return max(1, int(math.ceil(self.elite_ratio * self.population)))


@dataclass
class CEMResult:
    """The α found (tensor [K] or [L, K]), its score by the objective and tie-break, and the
    history: one dict per generation (mean, std, best so far, population statistics).

    :func:`fewshot_cem` also fills ``spec`` (the mixture to serve, module docstring),
    ``fewshot_accuracy`` (greedy accuracy of ``spec`` on the shots), ``base`` (the base model's
    ``{"accuracy", "likelihood"}`` there), ``kept_base`` (True when the search's best did not
    beat the base model: ``alpha`` is then 0 and ``spec`` None) and ``check_shots`` (how many
    held-out shots made that decision; 0: the searched ones).
    """
    alpha: torch.Tensor
    score: float
    tiebreak: float
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0
    wall_s: float = 0.0
    spec: object = None
    fewshot_accuracy: float | None = None
    base: dict | None = None
    kept_base: bool = False
    check_shots: int = 0

    def to_dict(self) -> dict:
        spec = self.spec.tolist() if isinstance(self.spec, torch.Tensor) else self.spec
        return {"alpha": self.alpha.tolist(), "spec": spec, "score": self.score,
                "tiebreak": self.tiebreak,
                "fewshot_accuracy": self.fewshot_accuracy, "base": self.base,
                "kept_base": self.kept_base, "check_shots": self.check_shots,
                "evaluations": self.evaluations,
                "wall_s": self.wall_s, "history": self.history}


#: How far inside ``max_l1`` :func:`transform` shrinks a row (relative): a member rounded back
#: to its dtype, and a residual member's base weight ``1 − Σα``, then still pass the handle's
#: exact float64 check of the bounds.
L1_MARGIN = 1e-5


def transform(samples: torch.Tensor, clamp=None, normalize: bool = False,
              bounds: MixtureBounds | None = None) -> torch.Tensor:
    """Clamp, then (optionally) normalize over the last dim (experts), then scale into
    ``bounds`` (``|α_k| ≤ max_abs``, then ``Σ_k |α_k| ≤ max_l1`` by shrinking the whole
    row, in float64 and :data:`L1_MARGIN` inside), so that every member is a mixture the
    handle accepts. Same shape and dtype as ``samples``."""
    x = samples
    if clamp is not None:
        x = x.clamp(clamp[0], clamp[1])
    if normalize:
        s = x.sum(-1, keepdim=True)
        a = x.abs().sum(-1, keepdim=True).clamp(min=1e-8)
        s = torch.where(s.abs() < 1e-6, a, s)
        x = x / s
    if bounds is not None:
        x = x.double().clamp(-bounds.max_abs, bounds.max_abs)
        l1 = x.abs().sum(-1, keepdim=True).clamp(min=1e-12)
        x = (x * (bounds.max_l1 * (1 - L1_MARGIN) / l1).clamp(max=1.0)).to(samples.dtype)
    return x


def cem_search(score_fn: Callable[[torch.Tensor], tuple], shape: Sequence[int],
               config: CEMConfig | None = None, callback: Callable[[dict], None] | None = None,
               bounds: MixtureBounds | None = None) -> CEMResult:
    """Maximise ``score_fn`` over α of ``shape`` with CEM; every member is scaled into
    ``bounds`` (see :func:`transform`).

    ``score_fn(alphas [P, *shape]) -> (accuracy [P], tiebreak [P])`` (tiebreak may be None);
    members are ranked by accuracy, then by tiebreak.
    """
    cfg = (config or CEMConfig()).validate()
    space = getattr(score_fn, "space", cfg.space)
    if space != cfg.space:
        raise ConfigError(f"CEMConfig.space={cfg.space!r}, but the scorer reads α in the "
                          f"{space!r} space; build it with space={cfg.space!r} (e.g. "
                          f"FewShotScorer(..., space={cfg.space!r}), as fewshot_cem does)")
    shape = tuple(shape)
    K = shape[-1]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.init_mean is None:
        mean = torch.zeros(shape, dtype=F32) if cfg.keep_base else \
            torch.full(shape, 1.0 / K, dtype=F32)
    else:
        im = torch.as_tensor(cfg.init_mean, dtype=F32)
        if im.dim() == 0 or im.shape == (K,) or im.shape == shape:
            mean = im.expand(shape).clone().float()
        else:
            raise ConfigError(f"CEMConfig.init_mean has shape {tuple(im.shape)}; expected a "
                              f"number, ({K},) or {shape}")
    std = torch.full(shape, cfg.init_std, dtype=F32)
    best_alpha, best_key = None, None
    history, n_eval, since = [], 0, 0
    t0 = time.perf_counter()
    for it in range(cfg.iterations):
        noise = torch.randn((cfg.population, *shape), generator=g, dtype=F32)
        raw = mean + std * noise
        if cfg.include_mean:
            raw[0] = mean
        pop = transform(raw, cfg.clamp, cfg.normalize, bounds)
        acc, tie = score_fn(pop)
        acc = torch.as_tensor(acc, dtype=torch.float64).reshape(-1)
        tie = (torch.zeros_like(acc) if tie is None else
               torch.as_tensor(tie, dtype=torch.float64).reshape(-1))
        tie = torch.nan_to_num(tie, nan=-1e30, neginf=-1e30)
        n_eval += cfg.population
        order = sorted(range(cfg.population), key=lambda i: (float(acc[i]), float(tie[i])),
                       reverse=True)
        top = order[0]
        key = (float(acc[top]), float(tie[top]))
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_alpha = key, pop[top].clone()
            since = 0
        else:
            since += 1
        elites = raw[order[:cfg.num_elites]]
        # refit on the transformed elites so the mean lives where members are evaluated
        elites_t = transform(elites, cfg.clamp, cfg.normalize, bounds)
        mean = elites_t.mean(0)
        std = (elites_t.std(0, unbiased=False) if elites.shape[0] > 1
               else torch.zeros_like(mean)).clamp(min=cfg.min_std)
        # scores by the search's objective (accuracy, or mean log-likelihood of the answers)
        rec = {"iteration": it, "best_score": best_key[0], "best_tiebreak": best_key[1],
               "gen_best_score": key[0], "pop_mean_score": float(acc.mean()),
               "elite_mean_score": float(acc[order[:cfg.num_elites]].mean()),
               "mean": mean.tolist(), "std_mean": float(std.mean()),
               "elapsed_s": time.perf_counter() - t0}
        history.append(rec)
        if callback is not None:
            callback(rec)
        if cfg.patience is not None and since >= cfg.patience:
            break
    if cfg.keep_best:
        alpha, (score, tiebreak) = best_alpha, best_key
    else:
        alpha = transform(mean, cfg.clamp, cfg.normalize, bounds)
        a, t = score_fn(alpha[None])
        score = float(torch.as_tensor(a).reshape(-1)[0])
        tiebreak = 0.0 if t is None else float(torch.as_tensor(t).reshape(-1)[0])
        n_eval += 1
    return CEMResult(alpha, score, tiebreak, history, n_eval, time.perf_counter() - t0)


class FewShotScorer:
    """Scores a population of α on few-shot examples of a task with the patched model.

    ``scorer(alphas [P, ...]) -> (score [P], tiebreak [P] or None)`` by ``objective``:
    ``"likelihood"``: (mean per-token log-likelihood of the correct answers, None), one
    teacher-forced forward over population × examples rows; ``"accuracy"``: (greedy accuracy,
    that likelihood as tie-break), one batched generation more. Every row carries its own
    mixture; ``max_rows`` splits larger batches. :meth:`measure` returns both numbers.
    """

    def __init__(self, handle, tokenizer, task, examples: Sequence, *,
                 max_new_tokens: int | None = None, max_rows: int | None = None,
                 objective: str = "accuracy", space: str = "absolute"):
        if not examples:
            raise ValueError("few-shot CEM needs at least one example")
        if not handle.expert_names:
            raise ValueError("few-shot CEM needs experts loaded in the handle")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")
        if space not in SPACES:
            raise ValueError(f"space={space!r}: expected one of {SPACES}")
        self.space = space
        self.handle = handle
        self.tokenizer = tokenizer
        self.task = task
        self.examples = list(examples)
        self.max_new_tokens = max_new_tokens_for(getattr(task, "name", None), max_new_tokens)
        self.max_rows = max_rows
        self.objective = objective
        self.calls = 0

    def _chunks(self, rows: int):
        step = self.max_rows or rows
        for i in range(0, rows, step):
            yield i, min(rows, i + step)

    def _rows(self, alphas: torch.Tensor) -> tuple[list, list[str]]:
        n = len(self.examples)
        specs = [mixture_spec(alphas[p], self.handle.expert_names, self.space)
                 for p in range(alphas.shape[0])]
        return ([spec for spec in specs for _ in range(n)],
                [e.prompt for e in self.examples] * alphas.shape[0])

    def accuracy(self, alphas: torch.Tensor) -> torch.Tensor:
        """Greedy accuracy on the shots of each member: float64 [P]."""
        specs, prompts = self._rows(alphas)
        n = len(self.examples)
        texts: list[str] = []
        try:
            for i, j in self._chunks(len(specs)):
                self.handle.set_mixture(rows=specs[i:j])
                texts.extend(generate(self.handle.model, self.tokenizer, prompts[i:j],
                                      max_new_tokens=self.max_new_tokens).texts)
        finally:
            self.handle.set_mixture(None)
        return torch.tensor([float(self.task.score(t, self.examples[k % n]).correct)
                             for k, t in enumerate(texts)], dtype=torch.float64).view(-1, n).mean(1)

    def likelihood(self, alphas: torch.Tensor) -> torch.Tensor:
        """Mean over the shots of the per-token log-likelihood of the correct answer, teacher
        forced, of each member: float64 [P]."""
        specs, prompts = self._rows(alphas)
        answers = [e.answer for e in self.examples] * alphas.shape[0]
        device = next(self.handle.model.parameters()).device
        ll = []
        try:
            for i, j in self._chunks(len(specs)):
                self.handle.set_mixture(rows=specs[i:j])
                batch = teacher_batch(self.tokenizer, prompts[i:j], answers[i:j], device=device)
                logits = completion_logits(self.handle.model, batch)
                lp = token_logprobs(logits, batch.completion_ids) * batch.completion_mask
                ll.append((lp.sum(-1) / batch.completion_mask.sum(-1)).cpu())
        finally:
            self.handle.set_mixture(None)
        return torch.cat(ll).double().view(alphas.shape[0], -1).mean(1)

    @torch.no_grad()
    def measure(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(greedy accuracy [P], likelihood [P]) of each member on the shots."""
        self.handle.set_trainable_z(None)
        return self.accuracy(alphas), self.likelihood(alphas)

    @torch.no_grad()
    def __call__(self, alphas: torch.Tensor):
        self.calls += 1
        if self.objective == "accuracy":
            return self.measure(alphas)
        self.handle.set_trainable_z(None)
        return self.likelihood(alphas), None


def mixture_spec(alpha: torch.Tensor, expert_names: Sequence[str], space: str = "residual"):
    """The mixture spec of a CEM α ([K] or [L, K]) in ``space``: the tensor itself for
    ``"absolute"``; ``{"base": 1 − Σ_k α_k, name_k: α_k}`` (per-layer lists for [L, K]) for
    ``"residual"``."""
    if space == "absolute":
        return alpha
    a = alpha.double()
    weights = [1 - a.sum(-1)] + [a[..., k] for k in range(a.shape[-1])]
    return {name: w.tolist() for name, w in zip(["base", *expert_names], weights)}


def residual_bounds(bounds: MixtureBounds) -> MixtureBounds:
    """Bounds on residual α that keep the mixture, base weight ``1 − Σα`` included, within
    ``bounds``: Σ|α| ≤ min((max_l1 − 1) / 2, max_abs − 1)."""
    l1 = min((bounds.max_l1 - 1) / 2, bounds.max_abs - 1)
    if l1 <= 0:
        raise ValueError(f"{bounds} leave no room for a residual α besides the base model")
    return MixtureBounds(max_abs=min(bounds.max_abs, l1), max_l1=l1)


def fewshot_examples(task, shots: int, shot_set: int = 0, split: str = "validation") -> list:
    """The few-shot examples of ``task`` for CEM: the ``shot_set``-th block of ``shots``
    consecutive examples of ``split`` (set 0 is the first ``shots`` examples, set 1 the next
    ``shots``, ...), so distinct sets never share an example."""
    for name, v, lo in (("shots", shots, 1), ("shot_set", shot_set, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
    return task.examples(split, shots * (shot_set + 1))[shots * shot_set:]


def fewshot_cem(handle, tokenizer, task, examples: Sequence, config: CEMConfig | None = None,
                *, max_new_tokens: int | None = None, max_rows: int | None = None,
                callback=None) -> CEMResult:
    """Few-shot CEM over the handle's loaded experts (bank order) on ``examples`` of ``task``.

    Returns α of shape [K] or, with ``config.per_layer``, [num_layers, K], and ``result.spec``,
    the mixture to pass to ``handle.set_mixture`` or :class:`t2fast.adapt.engine.FixedMixture`.
    With ``config.keep_base`` the result is the base model (``kept_base``, ``spec`` None) unless
    the search's best beats it by the objective and is at least as accurate; c =
    ``config.held_out(len(examples))`` (default: half the shots): the search uses all but the
    last c examples and that comparison (and ``fewshot_accuracy``, ``base``) the last c alone
    (c = 0: the searched examples).
    """
    cfg = (config or CEMConfig()).validate()
    names = handle.expert_names
    shape = (handle.num_layers, len(names)) if cfg.per_layer else (len(names),)
    examples = list(examples)
    held = cfg.held_out(len(examples))
    if held and held >= len(examples):
        raise ValueError(f"CEMConfig.check_shots={held} holds out every one of the "
                         f"{len(examples)} shots: expected fewer, so that some are searched on")
    searched = examples[:len(examples) - held]

    def scorer_on(shots):
        return FewShotScorer(handle, tokenizer, task, shots, max_new_tokens=max_new_tokens,
                             max_rows=max_rows, objective=cfg.objective, space=cfg.space)
    scorer = scorer_on(searched)
    check = scorer_on(examples[len(searched):]) if held else scorer
    bounds = (residual_bounds(handle.mixture_bounds) if cfg.space == "residual"
              else handle.mixture_bounds)
    res = cem_search(scorer, shape, cfg, callback=callback, bounds=bounds)
    res.spec, res.check_shots = mixture_spec(res.alpha, names, cfg.space), held
    candidates = torch.stack([torch.zeros(shape, dtype=F32), res.alpha.float()])
    if cfg.space == "absolute":                   # the base model is not an absolute α
        candidates = candidates[1:]
    acc, ll = check.measure(candidates)
    res.evaluations += len(candidates)
    res.fewshot_accuracy = float(acc[-1])
    if cfg.space == "residual":
        res.base = {"accuracy": float(acc[0]), "likelihood": float(ll[0])}
    if cfg.keep_base:
        if cfg.objective == "accuracy":
            beats = (float(acc[1]), float(ll[1])) > (float(acc[0]), float(ll[0]))
        else:
            beats = bool(acc[1] >= acc[0] and ll[1] > ll[0])
        if not beats:
            res.alpha, res.spec, res.kept_base = torch.zeros(shape, dtype=F32), None, True
            res.score = float(acc[0] if cfg.objective == "accuracy" else ll[0])
            res.fewshot_accuracy = float(acc[0])
    return res
