"""The ``t2fast`` command line.

    t2fast train --task arith --out experts/arith.safetensors --steps 200
    t2fast eval  --task arith --expert experts/arith.safetensors --split test --n 500
    t2fast adapt --experts experts/arith.safetensors experts/strings.safetensors \\
                 experts/choice.safetensors --strategy prompt --task arith_chain

Subcommands live in a registry: a module adds one with :func:`register` (a name, a help line,
``add_arguments(parser)`` and ``run(args) -> int``); modules named in ``SUBCOMMAND_MODULES`` are
imported when the parser is built, so other parts of the package can add subcommands without
editing this file's parser code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import BACKENDS, SVFConfig
from .targets import HALVES, PRESETS


@dataclass
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    #: Unknown options are handed to ``run`` as ``args._extra`` (e.g. vLLM's, for ``serve``).
    accepts_extra: bool = False


SUBCOMMANDS: dict[str, Subcommand] = {}
#: Modules that register further subcommands on import.
SUBCOMMAND_MODULES: list[str] = ["t2fast.serve.cli"]


def register(name: str, help: str, add_arguments, run, *, replace: bool = False,
             accepts_extra: bool = False) -> Subcommand:
    """Add a subcommand to ``t2fast``."""
    if name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} is already registered")
    cmd = Subcommand(name, help, add_arguments, run, accepts_extra)
    SUBCOMMANDS[name] = cmd
    return cmd


def _load_plugins() -> None:
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod)


# ---- shared helpers ------------------------------------------------------------------------
def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the bundled model), 'random[:SEED[:LAYERS]]' (a random tiny "
                        "model, for demos and tests) or a Hugging Face model folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def load_model(spec: str):
    """(model, tokenizer) for a ``--model`` value."""
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()    # no "Loading weights" bars around the CLI's output
    if spec == "tiny":
        from .models import load_tiny
        return load_tiny()
    if spec == "random" or spec.startswith("random:"):
        from .models import build_char_tokenizer, random_tiny_llama
        parts = spec.split(":")[1:]
        seed = int(parts[0]) if parts and parts[0] else 0
        over = {"num_hidden_layers": int(parts[1])} if len(parts) > 1 else {}
        return random_tiny_llama(seed, **over), build_char_tokenizer()
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"t2fast: --model {spec!r}: not 'tiny', 'random[:seed]' or a folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def parse_layers(text: str | None):
    """'0:2' → (0, 2); '1,3' → [1, 3]; '2' → 2; 'first_half' / 'second_half'; None → None."""
    if text is None or text in ("", "all", "none"):
        return None
    if text in HALVES:
        return text
    try:
        if ":" in text:
            a, b = text.split(":")
            return (int(a), int(b))
        if "," in text:
            return [int(v) for v in text.split(",") if v]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: expected START:STOP, a comma list, an int, first_half or "
            f"second_half") from None


def parse_targets(text: str):
    """'all' / 'attention' / 'mlp' / one name or glob as is; 'a,b' → ['a', 'b']."""
    return text if text in PRESETS or "," not in text else [t for t in text.split(",") if t]


#: The flag of each :class:`t2fast.config.SVFConfig` field the command line sets (``dest`` is
#: the field's name), so subcommands share one spelling, one parser and one help text.
SVF_FLAGS = {
    "targets": ("--targets", dict(type=parse_targets, help="matrices to adapt: all | attention | "
                                                            "mlp | comma list of names / globs")),
    "layers": ("--layers", dict(type=parse_layers, help="decoder layers: START:STOP | comma list "
                                                         "| int | first_half | second_half")),
    "backend": ("--backend", dict(choices=BACKENDS,
                                  help="SVF kernel backend (default: %(default)s)")),
    "hybrid": ("--hybrid", dict(action="store_true",
                                help="eager mode: dense weights for single-mixture steps "
                                     "(faster, but a request's answer may then depend on its "
                                     "batch)")),
    "cache_dir": ("--svd-cache-dir", dict(help="SVD cache folder (default: t2fast's)")),
    "allow_other_model": ("--allow-other-model", dict(
        action="store_true", help="accept experts made for another base model of equal shapes")),
    "max_alpha_abs": ("--max-alpha-abs", dict(type=float, help="bound on each |α_k| of a "
                                                               "mixture (default %(default)s)")),
    "max_alpha_l1": ("--max-alpha-l1", dict(type=float, help="bound on Σ|α_k| of a mixture "
                                                             "(default %(default)s)")),
}


def add_svf_arguments(p: argparse.ArgumentParser, fields, **defaults) -> None:
    """Add the :data:`SVF_FLAGS` of the :class:`t2fast.config.SVFConfig` ``fields``, with the
    field's default unless ``defaults`` gives another; :func:`svf_settings` reads them back."""
    base = SVFConfig()
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"add_svf_arguments: defaults {unknown} are not among fields {fields}")
    for name in fields:
        flag, kw = SVF_FLAGS[name]
        kw = dict(kw, dest=name, default=defaults.get(name, getattr(base, name)))
        if kw.get("action") == "store_true":
            kw.pop("default")
        p.add_argument(flag, **kw)


def svf_settings(args: argparse.Namespace, fields) -> dict:
    """``{field: value}`` of the :func:`add_svf_arguments` flags of ``fields`` in ``args``."""
    return {name: getattr(args, name) for name in fields}


def _emit(obj: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _set_threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


# ---- train ---------------------------------------------------------------------------------
TRAIN_SVF_FIELDS = ("targets", "layers", "backend")


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import (BASELINES, METHODS, OBJECTIVES, PARAMETERIZATIONS, REDUCTIONS,
                               TrainConfig)
    d = TrainConfig()
    p.add_argument("--task", required=True, help="task family to train on (e.g. arith, classify)")
    p.add_argument("--out", required=True,
                   help="expert file (.safetensors) for SVF; a folder for --method lora")
    add_model_argument(p)
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    p.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=d.parameterization)
    add_svf_arguments(p, TRAIN_SVF_FIELDS, targets=d.targets, layers=d.layers,
                      backend=d.backend)
    for name, typ in (("steps", int), ("batch_size", int), ("samples_per_prompt", int),
                      ("lr", float), ("min_lr_ratio", float), ("warmup_steps", int),
                      ("weight_decay", float), ("grad_clip", float), ("kl_coef", float),
                      ("temperature", float), ("top_k", int), ("max_new_tokens", int),
                      ("train_n", int), ("eval_n", int), ("eval_every", int),
                      ("eval_batch_size", int), ("patience", int), ("seed", int),
                      ("lora_rank", int), ("lora_alpha", float), ("official_init", float)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name))
    p.add_argument("--unparsable-penalty", type=float, default=None,
                   help="reward of an unparsable answer instead of -1 (e.g. -0.1)")
    p.add_argument("--logprob-reduction", choices=REDUCTIONS, default=d.logprob_reduction)
    p.add_argument("--baseline", choices=BASELINES, default=d.baseline)
    p.add_argument("--log-kl", action="store_true",
                   help="log the KL to the base model even when --kl-coef is 0 (one more forward)")
    p.add_argument("--eval-split", default=d.eval_split)
    p.add_argument("--log", default=None, help="JSONL log (default: <out>.log.jsonl)")
    p.add_argument("--checkpoint", default=None, help="resumable state (default: <out>.state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--tensorboard", default=None, help="TensorBoard folder (if installed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="do not use the SVD disk cache")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <out>.state.pt after a finished run (default: removed)")


def _train_run(args) -> int:
    from .train import TrainConfig, Trainer
    from .train.config import ConfigError
    _set_threads(args.threads)
    fields = {k: getattr(args, k) for k in (
        "task", "out", "method", "objective", "parameterization", "steps",
        "batch_size", "samples_per_prompt", "lr", "min_lr_ratio", "warmup_steps",
        "weight_decay", "grad_clip", "kl_coef", "temperature", "top_k", "max_new_tokens",
        "train_n", "eval_n", "eval_every", "eval_batch_size", "patience", "seed", "lora_rank",
        "lora_alpha", "official_init", "unparsable_penalty", "logprob_reduction", "baseline",
        "eval_split", "log_kl", "log", "checkpoint", "resume", "tensorboard", "threads")}
    fields.update(svf_settings(args, TRAIN_SVF_FIELDS))
    fields["progress"] = not args.no_progress
    fields["cache_dir"] = False if args.no_cache else None
    fields["extra"] = {"command": "t2fast " + " ".join(getattr(args, "_argv", []))}
    try:
        cfg = TrainConfig(**fields).validate()
    except ConfigError as e:
        print(f"t2fast train: {e}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model)
    trainer = Trainer(cfg, model, tok)
    res = trainer.train()
    print(json.dumps({"out": res.out, "best_validation_accuracy": res.best_score,
                      "best_step": res.best_step, "steps_run": res.steps_run,
                      "stopped_early": res.stopped_early, "num_parameters": res.num_parameters,
                      "wall_s": round(res.wall_s, 1)}))
    ckpt = cfg.checkpoint_path
    finished = res.steps_run >= cfg.steps or res.stopped_early
    if ckpt and ckpt.exists() and not args.keep_checkpoint and finished:
        ckpt.unlink()
    return 0


# ---- eval ----------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True)
    add_model_argument(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--expert", default=None, help="SVF expert file (default: the base model)")
    g.add_argument("--lora", default=None, help="LoRA adapter folder (PEFT)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=500,
                   help="examples (from the start of the split), at least 1")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=None)
    add_svf_arguments(p, ("backend",), backend="torch")
    p.add_argument("--json", default=None, help="write the result as JSON here")


def _eval_run(args) -> int:
    from .tasks import get_task
    from .train import evaluate, max_new_tokens_for
    _set_threads(args.threads)
    try:
        task = get_task(args.task)
    except KeyError as e:
        print(f"t2fast eval: {e.args[0]}", file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"t2fast eval: --n {args.n}: expected at least 1 example", file=sys.stderr)
        return 2
    from .train.policy import LoRAPolicy, lora_folder
    lora = lora_folder(args.lora, "--lora") if args.lora else None   # bad paths: before loading
    if args.expert:
        from .experts import load_expert
        load_expert(args.expert)
    model, tok = load_model(args.model)
    what = "base"
    if args.expert:
        import t2fast
        handle = t2fast.patch_model(model, experts=[args.expert], backend=args.backend)
        handle.set_mixture(handle.expert_names[0])
        what = f"expert {handle.expert_names[0]}"
    elif args.lora:
        model = LoRAPolicy.load(model, lora).model
        what = f"lora {args.lora}"
    examples = task.examples(args.split, args.n)
    res = evaluate(model, tok, task, examples,
                   max_new_tokens=max_new_tokens_for(task.name, args.max_new_tokens),
                   batch_size=args.batch_size)
    print(f"{what}: {res}")
    _emit({"model": args.model, "what": what, "split": args.split, **res.summary()}, args.json)
    return 0


# ---- adapt ---------------------------------------------------------------------------------
STRATEGIES = ("prompt", "classifier", "cem", "uniform", "base")


def _adapt_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--experts", nargs="+", required=True, help="expert files (pass-2 experts)")
    p.add_argument("--strategy", default="prompt",
                   help=f"one of {', '.join(STRATEGIES)}, or expert:NAME")
    p.add_argument("--classifier", default=None, help="classification expert file (strategy "
                                                      "classifier)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="evaluate on this task's split")
    src.add_argument("--prompt", nargs="+", help="answer these prompts (bare questions or "
                                                 "templated prompts)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=500,
                   help="examples of --task (from the start of --split), at least 1")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples for cem (taken "
                                                       "from the validation split)")
    p.add_argument("--shot-set", type=int, default=None,
                   help="which block of --shots validation examples cem uses (0: the first "
                        "--shots, 1: the next --shots, ...; default: the --seed value)")
    p.add_argument("--cem-iterations", type=int, default=20)
    p.add_argument("--cem-population", type=int, default=16)
    p.add_argument("--cem-elite-ratio", type=float, default=0.25)
    p.add_argument("--cem-std", type=float, default=0.3)
    p.add_argument("--save-profile", default=None, metavar="FILE",
                   help="cem: write the α found as a mixture profile (t2fast serve --profiles "
                        "NAME=FILE serves it as t2_adapt='profile:NAME')")
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="cem's search seed")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    add_svf_arguments(p, ("backend",), backend="torch")
    p.add_argument("--json", default=None)


def _adapt_run(args) -> int:
    import t2fast
    from .adapt import (CEMConfig, ClassifierDispatch, FixedMixture, PromptDispatch,
                        TwoPassEngine, fewshot_cem, fewshot_examples, uniform_alpha)
    from .tasks import format_prompt, get_task
    from .train import max_new_tokens_for
    from .train.evaluate import score_generations
    _set_threads(args.threads)
    if args.task and args.n < 1:
        print(f"t2fast adapt: --n {args.n}: expected at least 1 example", file=sys.stderr)
        return 2
    shot_set = args.seed if args.shot_set is None else args.shot_set
    if args.save_profile and args.strategy != "cem":
        print("t2fast adapt: --save-profile needs --strategy cem", file=sys.stderr)
        return 2
    if args.strategy == "cem" and (args.shots < 1 or shot_set < 0):
        print(f"t2fast adapt: --shots {args.shots} / --shot-set {shot_set}: expected "
              f"--shots >= 1 and --shot-set >= 0", file=sys.stderr)
        return 2
    model, tok = load_model(args.model)
    handle = t2fast.patch_model(model, experts=args.experts, backend=args.backend)
    experts = list(handle.expert_names)
    task = get_task(args.task) if args.task else None
    if task is not None:
        examples = task.examples(args.split, args.n)
        prompts = [e.prompt for e in examples]
    else:
        prompts = [p if p.rstrip().endswith("A:") else format_prompt(p) for p in args.prompt]
    extra: dict = {}
    s = args.strategy
    if s == "prompt":
        strategy = PromptDispatch(handle, tok, experts)
    elif s == "classifier":
        if not args.classifier:
            print("t2fast adapt: --strategy classifier needs --classifier FILE", file=sys.stderr)
            return 2
        strategy = ClassifierDispatch(handle, tok, args.classifier, experts)
    elif s == "cem":
        if task is None:
            print("t2fast adapt: --strategy cem needs --task (few-shot examples)",
                  file=sys.stderr)
            return 2
        shots = fewshot_examples(task, args.shots, shot_set)
        extra["shot_set"] = shot_set
        cfg = CEMConfig(population=args.cem_population, iterations=args.cem_iterations,
                        elite_ratio=args.cem_elite_ratio, init_std=args.cem_std,
                        per_layer=args.per_layer, normalize=args.normalize, seed=args.seed)
        res = fewshot_cem(handle, tok, task, shots, cfg)
        extra["cem"] = res.to_dict()
        if args.save_profile:
            from .serve.profiles import save_profile
            save_profile(args.save_profile, res.alpha, experts, task=task.name,
                         fewshot_accuracy=res.score, shots=args.shots, shot_set=shot_set,
                         seed=args.seed)
        strategy = FixedMixture(res.alpha, "cem")
        print(f"cem: alpha={[round(v, 3) for v in res.alpha.reshape(-1).tolist()]} "
              f"few-shot accuracy {res.score:.2f} ({res.evaluations} evaluations, "
              f"{res.wall_s:.1f}s)")
    elif s == "uniform":
        strategy = FixedMixture(uniform_alpha(len(experts)), "uniform")
    elif s == "base":
        strategy = FixedMixture(None, "base")
    elif s.startswith("expert:"):
        strategy = FixedMixture(s.split(":", 1)[1], s)
    else:
        print(f"t2fast adapt: unknown --strategy {s!r}; expected {', '.join(STRATEGIES)} or "
              f"expert:NAME", file=sys.stderr)
        return 2
    mnt = max_new_tokens_for(task.name if task else None, args.max_new_tokens)
    engine = TwoPassEngine(handle, tok, max_new_tokens=mnt, batch_size=args.batch_size)
    out = engine.run(prompts, strategy)
    summary = {"strategy": s, "experts": experts, "pass1_s": out.pass1_s,
               "pass2_s": out.pass2_s, **extra}
    if task is not None:
        ev = score_generations(task, out.outputs, examples)
        summary.update(ev.summary())
        if out.labels is not None:
            from collections import Counter
            summary["pass1_labels"] = dict(Counter(out.labels))
        print(f"{s}: {ev}  pass1 {out.pass1_s:.2f}s, pass2 {out.pass2_s:.2f}s")
    else:
        for p, o, m, l in zip(prompts, out.outputs, out.mixtures,
                              out.labels or [None] * len(prompts)):
            print(json.dumps({"prompt": p, "label": l, "mixture": _jsonable(m), "output": o}))
        print(f"pass1 {out.pass1_s:.3f}s, pass2 {out.pass2_s:.3f}s", file=sys.stderr)
    _emit(summary, args.json)
    return 0


# ---- import-official ------------------------------------------------------------------------
def _import_official_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the official code's policy_params.pt")
    add_model_argument(p)
    p.add_argument("--out", required=True,
                   help="expert file to write (.safetensors), else an expert folder")
    p.add_argument("--name", default=None,
                   help="expert name (default: the checkpoint's folder or file name)")
    p.add_argument("--max-mult", type=float, default=1.0, help="the official policy's max_mult")


def _import_official_run(args) -> int:
    from .official import import_official
    _set_threads(args.threads)
    model, _ = load_model(args.model)
    expert = import_official(args.checkpoint, model, args.name, args.max_mult,
                             base_model=Path(args.model).name)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        expert.save(out)
    else:
        expert.save_pretrained(out)
    print(f"wrote expert {expert.name!r} ({len(expert.z)} matrices) to {out}")
    return 0


def _jsonable(spec):
    try:
        import torch
        if isinstance(spec, torch.Tensor):
            return spec.tolist()
    except ImportError:
        pass
    return spec


register("train", "train an SVF expert (or a LoRA baseline) with REINFORCE + KL or SFT",
         _train_args, _train_run)
register("eval", "greedy accuracy of the base model, an SVF expert or a LoRA adapter on a task",
         _eval_args, _eval_run)
register("adapt", "two-pass adaptation (prompt / classifier / few-shot CEM / uniform) on a task "
                  "or on prompts", _adapt_args, _adapt_run)
register("import-official", "convert an expert trained with the official Transformer² code "
                            "(policy_params.pt) into a t2fast expert", _import_official_args,
         _import_official_run)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="t2fast", description="Transformer-Squared, fast: "
                                     "SVF experts, two-pass adaptation, per-request mixtures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args._argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if extra and not SUBCOMMANDS[args.command].accepts_extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"t2fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
