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
import dataclasses
import importlib
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

from .cli_types import (DTYPES, attention, check_model_placement, choice_or_named, device,
                        existing_file, expert_path, integer, model_spec,
                        output_file, output_path, parse_random, real, task_name)
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
    #: ``split_extra(argv) -> (own, passed_on)``: takes out of the subcommand's arguments the
    #: options it passes on (with their values) before they are parsed, so that a value of
    #: such an option is not read as one of the subcommand's positionals.
    split_extra: Callable[[list[str]], tuple[list[str], list[str]]] | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}
#: Modules that register further subcommands on import.
SUBCOMMAND_MODULES: list[str] = ["t2fast.serve.cli"]


def register(name: str, help: str, add_arguments, run, *, replace: bool = False,
             accepts_extra: bool = False, split_extra=None) -> Subcommand:
    """Add a subcommand to ``t2fast``."""
    if name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} is already registered")
    cmd = Subcommand(name, help, add_arguments, run, accepts_extra, split_extra)
    SUBCOMMANDS[name] = cmd
    return cmd


def _load_plugins() -> None:
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod)


# ---- shared helpers ------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it is None or False (nothing to show),
    the option is a flag (off unless given, whatever the field it sets) or the help text
    already speaks of it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if not action.option_strings or action.nargs == 0 or d is None or d is False \
                or d is argparse.SUPPRESS or d == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def add_model_argument(p: argparse.ArgumentParser, placement: bool = True) -> None:
    """``--model`` and ``--threads``; with ``placement`` also ``--device``, ``--dtype`` and
    ``--attn`` (read back by :func:`load_model`)."""
    p.add_argument("--model", type=model_spec, default="tiny",
                   help="'tiny' (the bundled model), 'random[:SEED[:LAYERS]]' (a random tiny "
                        "model, for demos and tests) or a local Hugging Face model folder")
    p.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads (default: torch's choice)")
    if placement:
        p.add_argument("--device", type=device, default="cpu",
                       help="where the model runs: cpu, cuda, cuda:N, mps")
        p.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="dtype of the model's weights and activations")
        p.add_argument("--attn", type=attention, default=None, metavar="{sdpa,eager,"
                                                                        "flash_attention_2}",
                       help="Hugging Face attention implementation (default: the model's, "
                            "sdpa where supported); flash_attention_2 needs the flash-attn "
                            "package, CUDA and bfloat16 or float16")


#: Files of which a model folder's tokenizer has at least one (fast, SentencePiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def load_model(spec: str, device: str = "cpu", dtype: str = "float32",
               attn: str | None = None):
    """(model, tokenizer) for a checked ``--model`` value, in eval mode on ``device`` in
    ``dtype`` (a :data:`t2fast.cli_types.DTYPES` name) with attention ``attn`` (None: the
    model's default)."""
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()    # no "Loading weights" bars around the CLI's output
    torch_dtype = getattr(torch, dtype)
    if spec.split(":")[0] == "random":
        from .models import build_char_tokenizer, random_tiny_llama
        seed, over = parse_random(spec)
        model = random_tiny_llama(seed, **over)
        if attn:
            model.set_attn_implementation(attn)
        return model.to(device=device, dtype=torch_dtype).eval(), build_char_tokenizer()
    if spec == "tiny":
        from .models import tiny_model_path
        path = tiny_model_path()
    else:
        path = Path(spec)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"--model {spec!r}: the folder holds no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)})")
    kw = {"attn_implementation": attn} if attn else {}
    try:                                # the tokenizer first: a folder without one fails fast
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     local_files_only=True, **kw)
    except (OSError, ValueError, SafetensorError) as exc:   # a file missing, truncated ...
        raise ValueError(f"--model {spec!r}: {' '.join(str(exc).split())[:300]}") from None
    return model.to(device).eval(), tokenizer


def _load(args):
    """(model, tokenizer) of a subcommand's :func:`add_model_argument` options."""
    return load_model(args.model, args.device, args.dtype, args.attn)


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """``--split`` and ``--n``: which examples of ``--task`` to answer."""
    from .tasks import SPLITS
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --task")
    p.add_argument("--n", type=integer(1), default=500,
                   help="examples of --task (from the start of --split)")


def add_generation_arguments(p: argparse.ArgumentParser, batch_size: int | None,
                             help: str | None = None) -> None:
    """``--batch-size`` (default ``batch_size``; None: all rows at once; ``help`` replaces its
    help text) and ``--max-new-tokens``."""
    p.add_argument("--batch-size", type=integer(1), default=batch_size,
                   help=help or "rows per generation call" + ("" if batch_size else
                                                              " (default: all at once)"))
    p.add_argument("--max-new-tokens", type=integer(1), default=None,
                   help="answer length (default: the task's)")


def usage_error(args: argparse.Namespace, option: str, message: str) -> NoReturn:
    """Report a bad option value found after parsing (exit 2, as argparse does)."""
    args._parser.error(f"argument {option}: {message}")


def task_examples(args, task, split: str, n: int, option: str = "--n") -> list:
    """The first ``n`` examples of ``split``, or a usage error naming ``option`` when the
    split holds fewer."""
    from .tasks.base import first_examples

    examples = first_examples(task, split, n)
    if len(examples) < n:
        usage_error(args, option, task.shortfall(split, n, len(examples)))
    return examples


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
                                                         "| int | first_half | second_half "
                                                         "(default: all)")),
    "backend": ("--backend", dict(choices=BACKENDS, help="SVF kernel backend")),
    "hybrid": ("--hybrid", dict(action="store_true",
                                help="eager mode: dense weights for single-mixture steps "
                                     "(faster, but a request's answer may then depend on its "
                                     "batch)")),
    "cache_dir": ("--svd-cache-dir", dict(help="SVD cache folder (default: $T2FAST_CACHE/svd, "
                                               "else t2fast/svd under $XDG_CACHE_HOME or "
                                               "~/.cache)")),
    "allow_other_model": ("--allow-other-model", dict(
        action="store_true", help="accept experts made for another base model of equal shapes")),
    "max_alpha_abs": ("--max-alpha-abs", dict(type=real(0, lo_open=True),
                                              help="bound on each |α_k| of a mixture")),
    "max_alpha_l1": ("--max-alpha-l1", dict(type=real(0, lo_open=True),
                                            help="bound on Σ|α_k| of a mixture")),
    "max_experts": ("--max-experts", dict(type=integer(1), help="expert bank capacity (experts "
                                                                "loaded at once; fixed for the "
                                                                "model's life)")),
    "merge_cache_bytes": ("--merge-cache-bytes", dict(
        type=integer(0), help="byte budget of merged weights cached for single-mixture steps "
                              "(default: half the device's free memory; 0 never merges)")),
    "deterministic": ("--order-dependent", dict(
        action="store_false", help="order-dependent SVF kernel plans (split-K at decode, the "
                                   "tuned table's faster backend per token count, mostly "
                                   "prefill): faster where the table says so, but a request's "
                                   "answer may then depend on its batch")),
}


#: The settings ``eval`` and ``adapt`` take for the experts they load.
EXPERT_SVF_FIELDS = ("backend", "allow_other_model")


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


def _progress(total: int, desc: str):
    """A progress bar on stderr, drawn on a terminal only (never escape codes in logs)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)


# ---- train ---------------------------------------------------------------------------------
TRAIN_SVF_FIELDS = ("targets", "layers", "backend")
#: The numeric :class:`t2fast.train.TrainConfig` fields with a flag: (parser, help).
TRAIN_NUMBERS = {
    "steps": (integer(1), "optimisation steps"),
    "batch_size": (integer(1), "prompts per step"),
    "samples_per_prompt": (integer(1), "sampled answers per prompt"),
    "lr": (real(0, lo_open=True), "AdamW learning rate (cosine decay)"),
    "min_lr_ratio": (real(0, 1), "the cosine decay ends at lr × this"),
    "warmup_steps": (integer(0), "linear warm-up steps"),
    "weight_decay": (real(0), "AdamW weight decay"),
    "grad_clip": (real(0), "max global gradient norm (0: off)"),
    "kl_coef": (real(0), "λ of λ·KL(π_W' ‖ π_W) to the base model (0: off)"),
    "temperature": (real(0, lo_open=True), "rollout sampling temperature"),
    "top_k": (integer(0), "rollout top-k (0: off)"),
    "max_new_tokens": (integer(1), "answer length (default: the task's)"),
    "train_n": (integer(1), "training examples drawn from the train split (default: the "
                            "split's default size)"),
    "eval_n": (integer(1), "validation examples"),
    "eval_every": (integer(0), "steps between validations (0: at the start and the end)"),
    "eval_batch_size": (integer(1), "rows per validation generation call"),
    "patience": (integer(1), "validations without improvement before stopping (default: "
                             "never stop early)"),
    "seed": (integer(0), "random seed"),
    "lora_rank": (integer(1), "LoRA rank (--method lora)"),
    "lora_alpha": (real(0, lo_open=True), "LoRA alpha (--method lora)"),
    "official_init": (real(), "initial logit p (--parameterization official)"),
}


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import (BASELINES, METHODS, OBJECTIVES, PARAMETERIZATIONS, REDUCTIONS,
                               TrainConfig)
    d = TrainConfig()
    p.add_argument("--task", required=True, type=task_name,
                   help="task family to train on (e.g. arith, classify)")
    p.add_argument("--out", required=True, type=output_path,
                   help="expert file (.safetensors) for SVF; a folder for --method lora")
    add_model_argument(p)
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="svf (train z vectors) or lora (a PEFT LoRA baseline)")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="rl (REINFORCE + KL) or sft (next-token loss on reference answers)")
    p.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=d.parameterization,
                   help="plain (z starts at 1) or official (z = sigmoid(p), nuclear-norm "
                        "rescale)")
    add_svf_arguments(p, TRAIN_SVF_FIELDS, targets=d.targets, layers=d.layers,
                      backend=d.backend)
    for name, (typ, text) in TRAIN_NUMBERS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name),
                       help=text)
    p.add_argument("--unparsable-penalty", type=real(-1, 1), default=None,
                   help="reward of an unparsable answer instead of -1 (e.g. -0.1)")
    p.add_argument("--logprob-reduction", choices=REDUCTIONS, default=d.logprob_reduction,
                   help="log π(ŷ|x) summed or averaged over answer tokens")
    p.add_argument("--baseline", choices=BASELINES, default=d.baseline,
                   help="none (plain REINFORCE) or mean (subtract the prompt's mean reward)")
    p.add_argument("--log-kl", action="store_true",
                   help="log the KL to the base model even when --kl-coef is 0 (one more forward)")
    from .tasks import SPLITS
    p.add_argument("--eval-split", choices=SPLITS, default=d.eval_split,
                   help="split for validation (best checkpoint, early stopping)")
    p.add_argument("--log", default=None, type=output_file,
                   help="JSONL log (default: <out>.log.jsonl)")
    p.add_argument("--checkpoint", default=None, type=output_file,
                   help="resumable state (default: <out>.state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--tensorboard", default=None, type=output_path,
                   help="TensorBoard folder (if installed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-cache", action="store_true", help="do not use the SVD disk cache")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <out>.state.pt after a finished run (default: removed)")


#: ``TrainConfig`` fields whose flag is not ``--<field>``.
TRAIN_FLAG_OF = {"cache_dir": "--no-cache", "progress": "--no-progress"}
#: ``t2fast train`` options that apply to one objective, method or parameterization only:
#: option → (field, the value it needs).
TRAIN_OPTION_NEEDS = {
    **{o: ("objective", "rl") for o in (
        "--samples-per-prompt", "--temperature", "--top-k", "--kl-coef", "--unparsable-penalty",
        "--logprob-reduction", "--baseline", "--log-kl")},
    "--lora-rank": ("method", "lora"), "--lora-alpha": ("method", "lora"),
    "--official-init": ("parameterization", "official"),
}


def _train_run(args) -> int:
    from .tasks import get_task
    from .train import TrainConfig, Trainer
    from .train.config import ConfigError
    from .train.trainer import run_examples
    _set_threads(args.threads)
    fields = {k: getattr(args, k) for k in (
        "task", "out", "method", "objective", "parameterization", *TRAIN_NUMBERS,
        "unparsable_penalty", "logprob_reduction", "baseline", "eval_split", "log_kl", "log",
        "checkpoint", "resume", "tensorboard", "threads")}
    fields.update(svf_settings(args, TRAIN_SVF_FIELDS))
    fields["progress"] = not args.no_progress
    fields["cache_dir"] = False if args.no_cache else None
    fields["extra"] = {"command": "t2fast " + " ".join(getattr(args, "_argv", []))}
    for option, (field, value) in TRAIN_OPTION_NEEDS.items():
        if _given(args, option) and fields[field] != value:
            usage_error(args, option, f"applies to --{field} {value} only (the {field} here is "
                                      f"{fields[field]})")
    try:
        cfg = TrainConfig(**fields).validate().check_files()
        with warnings.catch_warnings():          # data that cannot train: said before
            warnings.simplefilter("ignore")      # loading (the trainer warns of the rest)
            run_examples(get_task(cfg.task), cfg)
    except ConfigError as e:
        field = re.match(r"TrainConfig\.(\w+)", str(e))
        if field is None:
            args._parser.error(str(e))
        name = field.group(1)
        usage_error(args, TRAIN_FLAG_OF.get(name, "--" + name.replace("_", "-")), str(e))
    out = Path(cfg.out)
    if cfg.method == "lora" and out.is_file():
        usage_error(args, "--out", f"--method lora writes an adapter folder, but {cfg.out!r} is "
                                   f"a file")
    if cfg.method == "lora" and out.is_dir() and any(out.iterdir()) and \
            not (out / "adapter_config.json").exists():
        usage_error(args, "--out", f"{cfg.out!r} is a folder of other files (no "
                                   f"adapter_config.json); --method lora writes its adapter "
                                   f"into a new or an adapter folder")
    model, tok = _load(args)
    trainer = Trainer(cfg, model, tok)
    res = trainer.train()
    if res.interrupted:
        print(f"t2fast train: interrupted after step {res.steps_run} of {cfg.steps}; "
              f"{res.out} holds the best step so far ({res.best_step}). The checkpoint "
              f"{str(cfg.checkpoint_path)!r} continues the run: the same command with --resume",
              file=sys.stderr)
        return 130
    print(json.dumps({"out": res.out, "best_validation_accuracy": res.best_score,
                      "best_step": res.best_step, "steps_run": res.steps_run,
                      "stopped_early": res.stopped_early, "num_parameters": res.num_parameters,
                      "wall_s": round(res.wall_s, 1)}))
    if res.best_step == 0:
        print(f"t2fast train: warning: no step beat the starting point on the {cfg.eval_split} "
              f"split (best accuracy {res.best_score:.3f} at step 0), so {res.out} holds the "
              f"untrained start, which answers as the base model does; try more --steps, "
              f"another --lr or --kl-coef, or a larger --eval-n", file=sys.stderr)
    ckpt = cfg.checkpoint_path
    finished = res.steps_run >= cfg.steps or res.stopped_early
    if ckpt and ckpt.exists() and not args.keep_checkpoint and finished:
        ckpt.unlink()
    return 0


# ---- eval ----------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, type=task_name,
                   help="task to evaluate on: a bundled task (e.g. arith), or a JSONL data "
                        "set KIND:FILE (split 80/10/10 by question hash) or "
                        "KIND@SPLIT:FILE (the whole file is SPLIT), KIND: gsm8k, arc, mbpp, "
                        "humaneval")
    add_model_argument(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--expert", default=None, type=expert_path("expert file or folder"),
                   help="SVF expert file or folder (default: the base model)")
    g.add_argument("--lora", default=None, help="LoRA adapter folder (PEFT)")
    add_split_arguments(p)
    add_generation_arguments(p, batch_size=128)
    add_svf_arguments(p, EXPERT_SVF_FIELDS, backend="torch")
    p.add_argument("--json", default=None, type=output_file, help="write the result as JSON here")


def _eval_run(args) -> int:
    from .tasks import get_task
    from .train import evaluate, max_new_tokens_for
    _set_threads(args.threads)
    task = get_task(args.task)
    examples = task_examples(args, task, args.split, args.n)
    from .train.policy import LoRAPolicy, lora_folder
    lora = lora_folder(args.lora, "--lora") if args.lora else None   # bad paths: before loading
    if args.expert:
        from .experts import load_expert
        load_expert(args.expert)                                      # a bad file: before loading
    model, tok = _load(args)
    what = "base"
    if args.expert:
        import t2fast
        handle = t2fast.patch_model(model, experts=[args.expert],   # the matrices it adapts
                                    **svf_settings(args, EXPERT_SVF_FIELDS))
        handle.set_mixture(handle.expert_names[0])
        what = f"expert {handle.expert_names[0]}"
    elif args.lora:
        model = LoRAPolicy.load(model, lora).model
        what = f"lora {args.lora}"
    with _progress(len(examples), f"eval {task.name}") as bar:
        res = evaluate(model, tok, task, examples,
                       max_new_tokens=max_new_tokens_for(task.name, args.max_new_tokens),
                       batch_size=args.batch_size, before_chunk=lambda i, j: bar.update(i - bar.n))
        bar.update(len(examples) - bar.n)
    print(f"{what}: {res}")
    _emit({"model": args.model, "what": what, "split": args.split, **res.summary()}, args.json)
    return 0


# ---- adapt ---------------------------------------------------------------------------------
STRATEGIES = ("prompt", "classifier", "cem", "uniform", "base")


def profile_weights(spec, experts: list[str]) -> tuple[list, list[str]]:
    """(weights, names) of a CEM result's mixture spec for ``save_profile``: the K weights of an
    absolute α by expert name, or the weights of a residual α's dict, "base" included (None:
    the base model alone)."""
    if not isinstance(spec, dict):
        return (spec, experts) if spec is not None else ([1.0], ["base"])
    names = list(spec)
    cols = [spec[n] for n in names]
    if isinstance(cols[0], list):                  # per layer: rows of [layer][name]
        return [list(r) for r in zip(*cols)], names
    return cols, names


#: An ``adapt --strategy``: one of :data:`STRATEGIES` or ``expert:NAME``.
strategy = choice_or_named(STRATEGIES, "expert")


def _adapt_args(p: argparse.ArgumentParser) -> None:
    from .adapt.cem import OBJECTIVES, CEMConfig
    from .adapt.prompt import PROMPT_TEMPLATES
    c = CEMConfig()
    add_model_argument(p)
    p.add_argument("--experts", nargs="+", required=True,
                   type=expert_path("expert file or folder"),
                   help="expert files or folders (pass-2 experts)")
    p.add_argument("--strategy", default="prompt", type=strategy,
                   help=f"one of {', '.join(STRATEGIES)}, or expert:NAME")
    p.add_argument("--classifier", default=None, type=expert_path("classifier expert"),
                   help="classification expert file (needed by --strategy classifier)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", type=task_name, help="evaluate on this task's split")
    src.add_argument("--prompt", nargs="+", help="answer these prompts (bare questions or "
                                                 "templated prompts)")
    add_split_arguments(p)
    p.add_argument("--shots", type=integer(1), default=20,
                   help="few-shot examples for cem (taken from the validation split)")
    p.add_argument("--shot-set", type=integer(0), default=None,
                   help="which block of --shots validation examples cem uses (0: the first "
                        "--shots, 1: the next --shots, ...; default: the --seed value)")
    p.add_argument("--cem-iterations", type=integer(1), default=20, help="CEM generations")
    p.add_argument("--cem-population", type=integer(2), default=16,
                   help="CEM members per generation")
    p.add_argument("--cem-elite-ratio", type=real(0, 1, lo_open=True), default=0.25,
                   help="share of each generation kept as elites")
    p.add_argument("--cem-std", type=real(0, lo_open=True), default=0.3,
                   help="initial standard deviation of CEM's Gaussian")
    p.add_argument("--cem-objective", choices=OBJECTIVES, default=c.objective,
                   help="what cem ranks α by on the shots (likelihood of the correct answers, "
                        "or greedy accuracy)")
    p.add_argument("--cem-absolute", action="store_true",
                   help="cem searches the paper's absolute α (z' = Σ α_k z_k) instead of "
                        "residual α (z' = 1 + Σ α_k (z_k - 1)) and always returns its best "
                        "member, even one the shots find worse than the base model")
    p.add_argument("--cem-check-shots", type=integer(0), default=c.check_shots,
                   help="cem: hold out the last N of the --shots from the search; only they "
                        "decide whether the search's best replaces the base model (default: "
                        "half of the --shots; 0: the searched shots decide)")
    p.add_argument("--adapt-template", default="tiny", choices=tuple(PROMPT_TEMPLATES),
                   help="prompt strategy's pass-1 prompt: the tiny world's, or the paper's "
                        "listing the experts' names as categories (chat models)")
    p.add_argument("--restate", action="store_true",
                   help="pass 1 first has the base model restate each question (the first line "
                        "of its answer to 'step by step: QUESTION', as a model pre-trained on "
                        "two-step answers writes it); the strategy then picks for, and pass 2 "
                        "answers, the restated question (cem: searches on restated --shots, "
                        "scored as the task's parent training family)")
    p.add_argument("--save-profile", default=None, metavar="FILE", type=output_file,
                   help="cem: write the α found as a mixture profile (t2fast serve --profiles "
                        "NAME=FILE serves it as t2_adapt='profile:NAME'; with --restate, "
                        "t2fast serve --restate)")
    p.add_argument("--per-layer", action="store_true", help="cem: one α per decoder layer")
    p.add_argument("--normalize", action="store_true", help="cem: α sums to 1")
    p.add_argument("--seed", type=integer(0), default=c.seed, help="cem's search seed")
    add_generation_arguments(p, batch_size=None, help=(
        "rows per generation call in every pass: pass 1, the restatement, cem's scoring and "
        "pass 2 (default: 128 in pass 1 and the restatement, all at once otherwise)"))
    add_svf_arguments(p, EXPERT_SVF_FIELDS, backend="torch")
    p.add_argument("--json", default=None, type=output_file, help="write the summary as JSON here")


#: ``t2fast adapt`` options that only cem reads.
CEM_OPTIONS = ("--shots", "--shot-set", "--cem-iterations", "--cem-population",
               "--cem-elite-ratio", "--cem-std", "--cem-objective", "--cem-absolute",
               "--cem-check-shots", "--per-layer", "--normalize", "--seed")


def option_given(tokens, option: str, known=()) -> str | None:
    """The first of ``tokens`` (command-line words) that gives ``option``, or None.

    Spellings: ``--x v``, ``--x=v``, a prefix as argparse accepts it (with ``known``, the
    parser's option strings: a prefix of ``option`` alone; without, any prefix), and vLLM's
    own (``--x_y`` for ``--x-y``; ``--x.key v``, one key of a JSON option).
    """
    for token in tokens:
        if not token.startswith("--") or len(token) <= 2:
            continue
        word = "--" + token[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")
        if word == option or (option.startswith(word) and word not in known and (
                not known or [k for k in known if k.startswith(word)] == [option])):
            return token
    return None


def _given(args, option: str) -> bool:
    """Whether ``t2fast``'s own command line (``args._argv``) gives ``option``."""
    return option_given(getattr(args, "_argv", ()), option,
                        args._parser._option_string_actions) is not None


def _adapt_check(args):
    """Cross-option checks of ``t2fast adapt`` (usage errors, before any model is loaded);
    returns (task or None, its examples, the cem shots, the shot set)."""
    from .adapt import CEMConfig, fewshot_examples
    from .tasks import extract_question, get_task
    from .tasks.base import first_examples
    s = args.strategy
    if args.save_profile and s != "cem":
        usage_error(args, "--save-profile", "needs --strategy cem")
    if s == "classifier" and not args.classifier:
        usage_error(args, "--strategy", "classifier needs --classifier FILE")
    if args.classifier and s != "classifier":
        usage_error(args, "--classifier", f"is pass 1 of --strategy classifier; the strategy "
                                          f"here is {s}")
    unused = [o for o in CEM_OPTIONS if _given(args, o)]
    if unused and s != "cem":
        usage_error(args, unused[0], f"sets cem's search; it needs --strategy cem (the "
                                     f"strategy here is {s})")
    if args.adapt_template != "tiny" and s != "prompt":
        usage_error(args, "--adapt-template", "phrases the prompt strategy's pass 1; it needs "
                                              "--strategy prompt")
    if args.restate and args.adapt_template != "tiny":      # as t2fast serve says
        usage_error(args, "--restate", "asks the tiny world's 'step by step:' question; it "
                                       "needs --adapt-template tiny")
    if args.prompt and not all(extract_question(p) for p in args.prompt):
        usage_error(args, "--prompt", "a prompt holds no question")
    if s == "cem" and not args.task:
        usage_error(args, "--strategy", "cem needs --task (its few-shot examples)")
    task = get_task(args.task) if args.task else None
    examples = task_examples(args, task, args.split, args.n) if task else None
    shot_set = args.seed if args.shot_set is None else args.shot_set
    shots = None
    if args.cem_check_shots and args.cem_absolute:
        usage_error(args, "--cem-check-shots", "decides between the search and the base model; "
                                               "--cem-absolute never returns the base model")
    if args.cem_check_shots is not None and args.cem_check_shots >= args.shots:
        usage_error(args, "--cem-check-shots", f"must leave some of the --shots {args.shots} to "
                                               f"search on")
    if s == "cem":
        need = args.shots * (shot_set + 1)
        have = len(first_examples(task, "validation", need))
        if have < need:
            usage_error(args, "--shot-set" if args.shot_set is not None else
                        "--seed" if args.seed else "--shots",
                        f"cem's shots are block {shot_set} (--shot-set, default --seed) of "
                        f"--shots {args.shots} validation examples: "
                        f"{task.shortfall('validation', need, have)}")
        if args.split == "validation" and args.shots * shot_set < len(examples):
            first = -(-len(examples) // args.shots)
            usage_error(args, "--split", f"validation holds cem's shots (validation examples "
                                         f"{args.shots * shot_set}-"
                                         f"{args.shots * (shot_set + 1) - 1}), which the "
                                         f"{len(examples)} questions asked would include; use "
                                         f"--split test, or --shot-set {first} or later")
        shots = fewshot_examples(task, args.shots, shot_set)
        args.cem = CEMConfig(population=args.cem_population, iterations=args.cem_iterations,
                             elite_ratio=args.cem_elite_ratio, init_std=args.cem_std,
                             per_layer=args.per_layer, normalize=args.normalize,
                             seed=args.seed, objective=args.cem_objective,
                             space="absolute" if args.cem_absolute else "residual",
                             keep_base=not args.cem_absolute,
                             check_shots=args.cem_check_shots).validate()  # the flags are checked
    from .experts import load_expert
    # a bad file is reported before the model is loaded
    paths = list(args.experts) + ([args.classifier] if args.classifier else [])
    loaded = [load_expert(p) for p in paths]
    names = [e.name for e in loaded[:len(args.experts)]]
    if args.classifier and loaded[:-1] and set(loaded[-1].z) != set(loaded[0].z):
        usage_error(args, "--classifier", f"adapts {len(loaded[-1].z)} matrices and the "
                                          f"--experts {len(loaded[0].z)}, not the same ones: "
                                          f"one bank holds experts of the same matrices (train "
                                          f"the classification expert on the experts' targets)")
    if s.startswith("expert:") and s.split(":", 1)[1] not in names:
        usage_error(args, "--strategy", f"{s!r} names none of the --experts {names}")
    return task, examples, shots, shot_set


def _adapt_run(args) -> int:
    import t2fast
    from .adapt import (PROMPT_TEMPLATES, ClassifierDispatch, FixedMixture, PromptDispatch,
                        Restated, TwoPassEngine, fewshot_cem, restated_examples, restated_task,
                        uniform_alpha)
    from .tasks import extract_question, format_prompt
    from .train import max_new_tokens_for
    from .train.evaluate import score_generations
    _set_threads(args.threads)
    task, examples, shots, shot_set = _adapt_check(args)
    model, tok = _load(args)
    handle = t2fast.patch_model(model, experts=args.experts,   # the matrices they adapt
                                **svf_settings(args, EXPERT_SVF_FIELDS),
                                max_experts=max(SVFConfig().max_experts,
                                                len(args.experts) + bool(args.classifier)))
    experts = list(handle.expert_names)
    if task is not None:
        prompts = [e.prompt for e in examples]
    else:
        # bare, templated or half-templated ("Q: 4+64=?"): each in the template once
        prompts = [format_prompt(extract_question(p)) for p in args.prompt]
    extra: dict = {}
    rows = {} if args.batch_size is None else {"batch_size": args.batch_size}
    s = args.strategy
    if s == "prompt":
        strategy = PromptDispatch(handle, tok, experts, **rows,
                                  prompt_fn=PROMPT_TEMPLATES[args.adapt_template])
    elif s == "classifier":
        strategy = ClassifierDispatch(handle, tok, args.classifier, experts, **rows)
    elif s == "cem":
        extra["shot_set"] = shot_set
        scored_as = task
        if args.restate:                  # searched on the shots as pass 1 will restate them
            asked, shots = shots, restated_examples(handle, tok, shots, **rows)
            scored_as = restated_task(task)
            changed = sum(a.prompt != r.prompt for a, r in zip(asked, shots))
            extra["restated_shots"] = changed
            print(f"t2fast adapt: --restate: restated {changed} of {len(shots)} cem shots, "
                  f"scored as {scored_as.name} questions", file=sys.stderr)
        with _progress(args.cem.iterations, "cem") as bar:
            def step(rec):
                bar.update(1)
                bar.set_postfix(best_score=f"{rec['best_score']:.3g}", refresh=False)
            res = fewshot_cem(handle, tok, scored_as, shots, args.cem, callback=step,
                              max_rows=args.batch_size, max_new_tokens=args.max_new_tokens)
        extra["cem"] = res.to_dict()
        if args.save_profile:
            from .serve.profiles import save_profile
            save_profile(args.save_profile, *profile_weights(res.spec, experts),
                         task=task.name, fewshot_accuracy=res.fewshot_accuracy,
                         shots=args.shots, check_shots=res.check_shots, shot_set=shot_set,
                         seed=args.seed, restated=args.restate)
        strategy = FixedMixture(res.spec, "cem")
        n = res.check_shots
        deciding = f"the {n} held-out shot{'s' * (n != 1)}" if n else "the searched shots"
        found = (f"the base model (nothing beat it on {deciding})" if res.kept_base else
                 f"alpha={[round(v, 3) for v in res.alpha.reshape(-1).tolist()]} "
                 f"({args.cem.space})")
        print(f"cem: {found}, few-shot accuracy {res.fewshot_accuracy:.2f} on {deciding} "
              f"({res.evaluations} evaluations, {res.wall_s:.1f}s)")
    elif s == "uniform":
        strategy = FixedMixture(uniform_alpha(len(experts)), "uniform")
    elif s == "base":
        strategy = FixedMixture(None, "base")
    else:
        strategy = FixedMixture(s.split(":", 1)[1], s)
    if args.restate:
        strategy = Restated(strategy, handle, tok, **rows)
    mnt = max_new_tokens_for(task.name if task else None, args.max_new_tokens)
    engine = TwoPassEngine(handle, tok, max_new_tokens=mnt, batch_size=args.batch_size,
                           progress=True)
    out = engine.run(prompts, strategy)
    summary = {"strategy": s, "restated": args.restate, "experts": experts,
               "model": args.model, "split": args.split if task else None,
               "adapt_template": args.adapt_template, "classifier": args.classifier,
               "max_new_tokens": mnt, "pass1_s": out.pass1_s, "pass2_s": out.pass2_s,
               **({"cem_config": dataclasses.asdict(args.cem)} if s == "cem" else {}), **extra}
    if args.restate:
        done = sum(r is not None for r in strategy.last_restated)
        summary["restated_prompts"] = done
        print(f"t2fast adapt: --restate: restated {done} of {len(prompts)} prompts"
              + ("" if done else "; the model wrote no first step for any, so each was answered "
                                 "as asked (a model learns to restate from two-step answers in "
                                 "pre-training)"), file=sys.stderr)
    if task is not None:
        ev = score_generations(task, out.outputs, examples)
        summary.update(ev.summary())
        if out.labels is not None:
            from collections import Counter
            summary["pass1_labels"] = dict(Counter(out.labels))
        print(f"{s}: {ev}  pass1 {out.pass1_s:.2f}s, pass2 {out.pass2_s:.2f}s")
    else:
        for i, (p, o, m) in enumerate(zip(prompts, out.outputs, out.mixtures)):
            row = {"prompt": p, "label": out.labels and out.labels[i], "mixture": _jsonable(m),
                   "output": o}
            if out.answered is not None:            # --restate: the question pass 2 answered
                row["answered"] = out.answered[i]
            print(json.dumps(row))
        print(f"pass1 {out.pass1_s:.3f}s, pass2 {out.pass2_s:.3f}s", file=sys.stderr)
    _emit(summary, args.json)
    return 0


# ---- import-official ------------------------------------------------------------------------
def _import_official_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=existing_file("official checkpoint"),
                   help="a checkpoint of the official code: policy_params.pt (an SVF policy "
                        "or a weighted combination found by its CEM) or learnable_params.pt "
                        "(save_legacy_params)")
    add_model_argument(p, placement=False)
    p.add_argument("--out", required=True, type=output_path,
                   help="expert file to write (.safetensors), else an expert folder")
    p.add_argument("--name", default=None,
                   help="expert name (default: the checkpoint's folder or file name)")
    p.add_argument("--max-mult", type=real(0, lo_open=True), default=1.0,
                   help="the official policy's max_mult")
    p.add_argument("--norm-coeffs", choices=("true", "false"), default=None,
                   help="weighted combinations only: the run's norm_coeffs setting, which the "
                        "file does not record (required for such a file)")


def _import_official_run(args) -> int:
    from .mixtures import check_expert_name
    from .official import default_expert_name, import_official
    _set_threads(args.threads)
    name = args.name or default_expert_name(args.checkpoint)
    try:
        check_expert_name(name, "--name" if args.name else
                          f"the name taken from {args.checkpoint!r}")
    except ValueError as e:
        usage_error(args, "--name", str(e) + ("" if args.name else "; pass --name"))
    model, _ = load_model(args.model)
    norm = None if args.norm_coeffs is None else args.norm_coeffs == "true"
    expert = import_official(args.checkpoint, model, name, args.max_mult,
                             base_model=Path(args.model).name, norm_coeffs=norm)
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
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help,
                            formatter_class=HelpFormatter)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run, _parser=sp)
    return parser


def main(argv=None) -> int:
    """Run ``t2fast ARGV``; returns the exit status (2 for a usage error, 0 after ``--help``)
    instead of raising ``SystemExit``."""
    try:
        return _main(argv)
    except SystemExit as e:         # argparse: usage errors and --help
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)  # what Python does with SystemExit("message")
        return 1


def _main(argv) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = SUBCOMMANDS.get(argv[0]) if argv else None
    passed_on: list[str] = []
    if cmd is not None and cmd.split_extra is not None:
        own, passed_on = cmd.split_extra(argv[1:])
        args, extra = parser.parse_known_args([argv[0], *own])
    else:
        args, extra = parser.parse_known_args(argv)
    args._argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if extra and not SUBCOMMANDS[args.command].accepts_extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = passed_on + extra
    if hasattr(args, "attn"):
        check_model_placement(args._parser, args)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        own = f"t2fast {args.command}: "        # a message that already names the command
        text = str(e)[len(own):] if str(e).startswith(own) else str(e)
        print(f"{own}error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
