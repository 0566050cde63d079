"""``t2fast serve``: vLLM's OpenAI-compatible server with SVF experts.

    t2fast serve tiny --experts experts/arith.safetensors experts/strings.safetensors \\
        experts/choice.safetensors --classifier experts/classify.safetensors --adapt prompt

It builds vLLM's own ``serve`` arguments — the t2fast architecture (``--hf-overrides``), the
engine settings and the server settings (``--additional-config``), the worker extension — adds
CPU-friendly defaults, allowlists t2fast's plugins in ``VLLM_PLUGINS`` and runs vLLM's ``serve``
command in this process. Every option t2fast does not know goes to vLLM unchanged
(``--enforce-eager``, ``--max-model-len 512``, ``--served-model-name tiny`` ...), with the values
vLLM reads for it (:func:`split_vllm_options`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..cli import add_svf_arguments, option_given, register, svf_settings
from ..cli_types import choice_or_named, integer, shipped_experts

ENDPOINT_GROUP = "vllm.endpoint_plugins"
GENERAL_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "t2fast"
#: The t2fast settings (:class:`t2fast.vllm.T2Config` fields) ``t2fast serve`` has flags for.
SERVE_SVF_FIELDS = ("targets", "layers", "max_experts", "backend", "hybrid", "merge_cache_bytes",
                    "cache_dir", "allow_other_model", "max_alpha_abs", "max_alpha_l1",
                    "deterministic")
#: vLLM options that ``t2fast serve`` sets itself.
OWNED_VLLM_OPTIONS = ("--hf-overrides", "--additional-config", "--worker-extension-cls",
                      "--model")
#: A Hugging Face hub id: ``NAME`` or ``OWNER/NAME`` (a model that is no local path is left to
#: vLLM when it looks like one).
HUB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)?")


def expert_entry(text: str) -> str:
    """A ``--experts`` entry: ``PATH`` or ``NAME=PATH`` of an expert file or folder; PATH may
    be the name of an expert shipped for the bundled model (``arith`` ...)."""
    name, path = _named(text)
    if Path(path).exists():
        return text
    plain = text if name is None else text.partition("=")[2]
    shipped = shipped_experts()
    if plain in shipped:
        return str(shipped[plain]) if name is None else f"{name}={shipped[plain]}"
    known = f" or the name of a shipped expert ({', '.join(shipped)})" if shipped else ""
    raise argparse.ArgumentTypeError(f"expected [NAME=]PATH of an existing expert file or "
                                     f"folder{known}, got {text!r}")


def profile_entry(text: str) -> str:
    """A ``--profiles`` entry: ``NAME=FILE`` of a mixture profile."""
    name, path = _named(text)
    if name is None or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE of an existing profile file, "
                                         f"got {text!r}")
    return text


def adapt_mode(text: str) -> str:
    """A ``--adapt`` value: none, prompt, classifier or profile:NAME."""
    from ..mixtures import PROFILE_PREFIX
    from .translate import ADAPT_MODES

    return choice_or_named(ADAPT_MODES, PROFILE_PREFIX.rstrip(":"))(text)


def check_args(args) -> None:
    """Cross-option checks of ``t2fast serve`` (usage errors, before vLLM is imported)."""
    from ..cli import usage_error
    from ..mixtures import profile_name

    if args.adapt == "classifier" and not args.classifier:
        usage_error(args, "--adapt", "classifier needs --classifier")
    if args.restate and args.adapt_template != "tiny":
        usage_error(args, "--restate", "asks the tiny world's 'step by step:' question; it "
                                       "needs --adapt-template tiny")
    profiles = {_named(e)[0] for e in args.profiles}
    if profile_name(args.adapt) not in (None, *profiles):
        usage_error(args, "--adapt", f"{args.adapt!r} names no --profiles entry (given: "
                                     f"{sorted(profiles) or 'none'})")
    c = args.classifier
    if c is not None and "=" in c and not Path(_named(c)[1]).exists():
        usage_error(args, "--classifier", f"{c!r}: no such expert file or folder")
    root = args.runtime_loading_root
    if args.allow_runtime_loading and root is None:
        usage_error(args, "--allow-runtime-loading", "needs --runtime-loading-root DIR (the "
                                                     "folder loaded files must lie in)")
    if root is not None and not args.allow_runtime_loading:
        usage_error(args, "--runtime-loading-root", "is given without --allow-runtime-loading")
    if root is not None and not Path(root).is_dir():
        usage_error(args, "--runtime-loading-root", f"{root!r} is not a folder")
    check_model(args)
    check_names(args)


def check_model(args) -> None:
    """``MODEL``: ``tiny``, a folder with a ``config.json`` or (no such path) a hub id."""
    from ..cli import usage_error

    model = args.model
    if model == "tiny":
        return
    if not model:
        usage_error(args, "model", "is empty: give 'tiny', a model folder or a hub id")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            usage_error(args, "model", f"{model!r} is a folder without config.json (not a "
                                       f"Hugging Face model folder)")
    elif path.exists():
        usage_error(args, "model", f"{model!r} is a file, not a model folder (a folder with "
                                   f"config.json)")
    elif model.startswith(("/", "./", "../", "~")) or not HUB_ID.fullmatch(model):
        usage_error(args, "model", f"{model!r}: no such model folder")


def base_names(args) -> list[str]:
    """The base model's served names: vLLM's ``--served-model-name`` values among the options
    passed on, else ``tiny`` or ``MODEL`` as given."""
    extra, names, i = list(getattr(args, "_extra", None) or []), None, 0
    while i < len(extra):
        option, sep, value = extra[i].partition("=")
        i += 1
        if option.replace("_", "-") != "--served-model-name":
            continue
        names = [value] if sep else []
        while not sep and i < len(extra) and not extra[i].startswith("-"):
            names.append(extra[i])
            i += 1
    return names or [args.model]


def check_names(args) -> None:
    """The expert names of ``--experts`` and ``--classifier`` (``NAME=``, or the name stored in
    an unnamed file): valid, none twice, none a served name of the base model; no file twice
    unnamed; a classifier given by name names one of ``--experts``; no profile name twice."""
    from ..cli import usage_error
    from ..experts import load_expert
    from ..mixtures import check_expert_name

    served = base_names(args)
    entries = [("--experts", e) for e in args.experts]
    c, bare = args.classifier, None
    if c is not None:
        if Path(c).exists() or "=" in c:
            entries.append(("--classifier", c))
        else:
            bare = c
    names: dict[str, tuple[str, str]] = {}    # expert name -> (option, entry)
    files: dict[str, tuple[str, str]] = {}    # unnamed file -> (option, entry)
    for option, entry in entries:
        name, path = _named(entry)
        if name is None:
            if path in files:
                hint = "; name it by its expert name" if option == "--classifier" else ""
                usage_error(args, option, f"{entry!r} is given twice (as {files[path][0]} "
                                          f"{files[path][1]!r} too){hint}")
            files[path] = (option, entry)
            try:                        # the name stored in the file (it is read in full)
                name = load_expert(path).name
            except (ValueError, OSError) as exc:
                usage_error(args, option, str(exc))
            what = f"{entry!r}: its expert name {name!r}"
        else:
            try:
                check_expert_name(name, f"{entry!r}: expert name")
                load_expert(path)           # read and checked now, not after vLLM's start
            except (ValueError, OSError) as exc:
                usage_error(args, option, str(exc))
            what = f"{entry!r}: expert name {name!r}"
        if name in served:
            usage_error(args, option, f"{what} is the base model's served name")
        if name in names:
            usage_error(args, option, f"{what} is given twice (by {names[name][0]} "
                                      f"{names[name][1]!r} too)")
        names[name] = (option, entry)
    if bare is not None and bare not in names:
        usage_error(args, "--classifier", f"{bare!r} is neither an expert file nor the name "
                                          f"of one of --experts (their names: "
                                          f"{sorted(names) or 'none'})")
    profiles: dict[str, str] = {}
    for entry in args.profiles:
        name = _named(entry)[0]
        if name in profiles:
            usage_error(args, "--profiles", f"profile name {name!r} is given twice "
                                            f"({profiles[name]!r} and {entry!r})")
        profiles[name] = entry


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..adapt.prompt import PROMPT_TEMPLATES

    p.add_argument("model", help="'tiny' (the bundled model) or a Llama / Mistral / Qwen2 "
                                 "checkpoint (folder or hub name)")
    p.add_argument("--experts", nargs="+", default=[], metavar="[NAME=]PATH", type=expert_entry,
                   help="expert files served from the start, in bank order (the order of "
                        "t2_alpha lists); NAME= serves one under another name")
    p.add_argument("--classifier", default=None, metavar="[NAME=]PATH|NAME",
                   help="classification expert for t2_adapt='classifier' (a file, loaded too, "
                        "after --experts, or the name of one of --experts)")
    p.add_argument("--adapt", default="none", type=adapt_mode,
                   help="t2_adapt of requests that name no mixture: none (the base model), "
                        "prompt, classifier or profile:NAME")
    p.add_argument("--profiles", nargs="+", default=[], metavar="NAME=FILE", type=profile_entry,
                   help="mixture profiles (saved α) served as t2_adapt='profile:NAME'")
    p.add_argument("--adapt-template", default="tiny", choices=tuple(PROMPT_TEMPLATES),
                   help="pass-1 prompt: the tiny world's or the paper's (chat models)")
    p.add_argument("--restate", action="store_true",
                   help="pass 1 of every adapted request (t2_adapt) first has the base model "
                        "restate its question (the first line of its answer to 'step by step: "
                        "QUESTION'); the request then asks the restated question (x-t2-restated "
                        "says which; tiny template only; profiles must come from t2fast adapt "
                        "--restate)")
    add_svf_arguments(p, SERVE_SVF_FIELDS)
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable POST/DELETE /v1/t2/experts (they read files named by clients; "
                        "needs --runtime-loading-root)")
    p.add_argument("--runtime-loading-root", default=None, metavar="DIR",
                   help="the folder whose expert files clients may load (paths resolve inside "
                        "it, symlinks included)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="port to listen on")
    p.epilog = ("Every other option goes to vLLM's serve unchanged (python -m "
                "vllm.entrypoints.openai.api_server --help lists them), with its value.")


def vllm_parser() -> argparse.ArgumentParser:
    """vLLM's own ``serve`` argument parser."""
    from ..vllm.environment import import_vllm

    import_vllm()
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="t2fast serve"))


def split_vllm_options(argv: list[str], parser=None) -> tuple[list[str], list[str]]:
    """(t2fast's arguments, vLLM's options with their values) of ``t2fast serve``'s ``argv``.

    An option t2fast does not define but vLLM's ``parser`` (default: :func:`vllm_parser`,
    built only when such an option appears) does is taken out with as many values as vLLM
    reads for it, so ``--max-model-len 512 tiny`` serves ``tiny`` with 512 positions.
    Options neither knows stay with t2fast's arguments (and reach vLLM, which refuses them).
    """
    own = argparse.ArgumentParser(add_help=True)
    _add_args(own)
    ours = own._option_string_actions
    out, passed, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        action = None
        if name.startswith("--") and name != "--" and name not in ours:
            if parser is None:
                try:
                    parser = vllm_parser()
                except ImportError:     # no vLLM: serve reports it once it runs
                    return list(argv), []
            action = parser._option_string_actions.get(name.replace("_", "-"))
        if action is None:
            out.append(token)
            i += 1
            continue
        j = i + 1 + (0 if "=" in token else _value_count(action.nargs, argv[i + 1:]))
        passed.extend(argv[i:j])
        i = j
    return out, passed


def _value_count(nargs, rest: list[str]) -> int:
    """How many tokens of ``rest`` argparse reads as the values of an option with ``nargs``."""
    if nargs == 0:
        return 0
    if nargs in (None, "?"):
        return int(bool(rest) and not rest[0].startswith("--"))
    if isinstance(nargs, int):
        return min(nargs, len(rest))
    count = 0                           # "+", "*": every token up to the next option
    while count < len(rest) and not rest[count].startswith("-"):
        count += 1
    return count


def _named(entry: str) -> tuple[str | None, str]:
    """``NAME=PATH`` → (NAME, absolute PATH); ``PATH`` → (None, absolute PATH)."""
    name, sep, path = entry.partition("=")
    if not sep or Path(entry).exists():
        name, path = None, entry
    return name, str(Path(path).resolve())


def vllm_arguments(args, extra: list[str], known=()) -> list[str]:
    """vLLM ``serve`` arguments for the parsed ``t2fast serve`` ones (``extra``: vLLM's own;
    ``known``: its parser's option strings, which decide what an abbreviation names)."""
    from ..vllm.config import T2Config
    from ..vllm.llm import engine_args
    from .config import SERVE_KEY, ServeConfig

    for option in OWNED_VLLM_OPTIONS:
        token = option_given(extra, option, known)
        if token is not None:
            given = "" if token.split("=", 1)[0] == option else f" (given as {token!r})"
            raise ValueError(f"t2fast serve sets {option} itself{given}: vLLM would replace "
                             f"t2fast's value with this one; use t2fast serve's own options "
                             f"(t2fast serve --help)")
    model = os.path.expanduser(args.model)
    served = []
    if model == "tiny":
        from ..models import tiny_model_path

        model = str(tiny_model_path())
        served = ["--served-model-name", "tiny"]
        if option_given(extra, "--dtype", known) is None:  # the float32 weights it was trained in
            served += ["--dtype", "float32"]
    from ..vllm.frontend import expert_file_name

    entries, classifier = list(args.experts), args.classifier
    if classifier is not None and (Path(classifier).exists() or "=" in classifier):
        entries.append(classifier)          # the classification expert is the last in the bank
        name, path = _named(classifier)
        classifier = name or expert_file_name(path)
    # the bank in the order given: the unnamed files before the first NAME= entry start with
    # the engine, the others are loaded under their names once it runs (ServeConfig)
    files, named = [], {}
    for entry in entries:
        name, path = _named(entry)
        if name is None and not named:
            files.append(path)
            continue
        name = name or expert_file_name(path)
        if name in named:                     # check_names says so first, on the CLI
            raise ValueError(f"t2fast serve: {entry!r}: the expert name {name!r} is given "
                             f"twice")
        named[name] = path
    settings = svf_settings(args, SERVE_SVF_FIELDS)
    if named:                               # the bank holds every expert given
        settings["max_experts"] = max(settings["max_experts"] or T2Config().max_experts,
                                      len(files) + len(named))
    profiles = {}
    for entry in args.profiles:
        name, path = _named(entry)
        if name is None:
            raise ValueError(f"--profiles {entry!r}: expected NAME=FILE")
        profiles[name] = path
    serve_cfg = ServeConfig(adapt=args.adapt, classifier=classifier,
                            adapt_template=args.adapt_template,
                            allow_runtime_loading=args.allow_runtime_loading,
                            runtime_loading_root=None if args.runtime_loading_root is None
                            else str(Path(args.runtime_loading_root).resolve()),
                            named_experts=named, profiles=profiles, restate=args.restate)
    kw = engine_args(model, files, **settings)  # checked before start
    kw["additional_config"][SERVE_KEY] = serve_cfg.to_dict()
    out = [model, *served, "--host", args.host, "--port", str(args.port),
           "--hf-overrides", json.dumps(kw["hf_overrides"]),
           "--additional-config", json.dumps(kw["additional_config"]),
           "--worker-extension-cls", kw["worker_extension_cls"]]
    return out + cpu_defaults(extra, known) + list(extra)


def cpu_defaults(extra: list[str], known=()) -> list[str]:
    """On vLLM's CPU build, a KV cache sized to the machine unless ``extra`` sizes it
    (:func:`t2fast.vllm.environment.cpu_kv_cache_bytes`)."""
    from ..vllm.environment import KV_OPTIONS, cpu_kv_cache_bytes

    size = cpu_kv_cache_bytes(any(option_given(extra, o, known) for o in KV_OPTIONS))
    return [] if size is None else [KV_OPTIONS[0], str(size)]


def check_plugins_installed() -> None:
    """The endpoint plugin is found through package metadata: fail clearly without it."""
    from importlib.metadata import entry_points

    for group in (GENERAL_GROUP, ENDPOINT_GROUP):
        if not any(ep.name == PLUGIN_NAME for ep in entry_points(group=group)):
            raise ImportError(f"t2fast's {group} entry point is not installed; reinstall "
                              f"t2fast (pip install t2fast, or pip install -e . in a checkout) "
                              f"so that vLLM finds its plugins")


def allowlist_plugins() -> None:
    """Name t2fast in ``VLLM_PLUGINS`` (vLLM loads endpoint plugins only when named there),
    keeping every general plugin that would load without the allowlist."""
    from importlib.metadata import entry_points

    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = [ep.name for ep in entry_points(group=GENERAL_GROUP)]
    else:
        names = [n for n in current.split(",") if n]
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(names))


def _run(args) -> int:
    from ..vllm.environment import import_vllm, startup_errors

    check_args(args)
    import_vllm()
    check_plugins_installed()
    allowlist_plugins()
    parser = vllm_parser()
    argv = vllm_arguments(args, list(getattr(args, "_extra", [])),
                          parser._option_string_actions)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           "%m-%d %H:%M:%S"))
    t2_logger = logging.getLogger("t2fast")
    t2_logger.addHandler(handler)
    t2_logger.setLevel(logging.INFO)
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    vargs = parser.parse_args(argv)
    if vargs.api_server_count not in (None, 1) or vargs.headless:
        raise ValueError("t2fast serve runs one API server process (the expert list lives "
                         "there); drop --api-server-count / --headless")
    vargs.api_server_count = 1
    configure_logging_from_args(vargs)
    validate_parsed_serve_args(vargs)
    with startup_errors():
        ServeSubcommand.cmd(vargs)
    return 0


register("serve", "OpenAI-compatible HTTP server over vLLM: experts as models, per-request "
                  "mixtures, automatic two-pass adaptation", _add_args, _run,
         accepts_extra=True, split_extra=split_vllm_options)
