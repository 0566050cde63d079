"""Checked option values for the ``t2fast`` command line.

The option checks here (``integer(1)``, ``real(0)``, ``existing_file("what")`` ... return them)
are ``argparse`` ``type=`` functions: each turns the option's text into its value or raises
:class:`argparse.ArgumentTypeError`, which argparse reports as
``t2fast CMD: error: argument --OPTION: expected ..., got 'TEXT'`` with exit status 2 — before
any model is loaded or any file is written. :func:`check_model_placement` checks the
combination of ``--device``, ``--dtype`` and ``--attn`` the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

#: ``--dtype`` names and the torch dtypes they stand for.
DTYPES = ("float32", "bfloat16", "float16")
#: ``--attn``: Hugging Face attention implementations.
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def _bad(why: str, text: str):
    return argparse.ArgumentTypeError(f"expected {why}, got {text!r}")


def integer(lo: int, hi: int | None = None):
    """An integer in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""
    why = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _bad(why, text) from None
        if v < lo or (hi is not None and v > hi):
            raise _bad(why, text)
        return v
    parse.__name__ = why
    return parse


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); None: unbounded."""
    bounds = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []) + \
        ([f"<= {hi:g}"] if hi is not None else [])
    why = " ".join(["a finite number", " and ".join(bounds)]).strip()

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise _bad(why, text) from None
        if not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) \
                or (hi is not None and v > hi):
            raise _bad(why, text)
        return v
    parse.__name__ = why
    return parse


def output_file(text: str) -> str:
    """A file path that can be written: not a folder, and every existing ancestor a writable
    folder (missing folders are created when the file is written)."""
    path = Path(text)
    if not text or path.is_dir():
        raise _bad("a file path (not a folder)", text)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written (permission denied)")
    _writable_parent(path, text)
    return text


def output_path(text: str) -> str:
    """A file or folder path to be created or replaced: the nearest existing ancestor is a
    writable folder."""
    if not text:
        raise _bad("a path", text)
    _writable_parent(Path(text), text)
    return text


def _writable_parent(path: Path, text: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(parent)!r} is a "
                                         f"file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(parent)!r} is "
                                         f"not writable")


def existing_file(what: str = "file"):
    """A file that exists and can be read (``what`` names it in errors)."""
    def parse(text: str) -> str:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{what} {text!r} does not exist")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a file")
        if not os.access(path, os.R_OK):
            raise argparse.ArgumentTypeError(f"{what} {text!r} cannot be read (permission "
                                             f"denied)")
        return text
    parse.__name__ = what
    return parse


def shipped_experts() -> dict:
    """``{name: path}`` of the experts shipped for the bundled model (none: empty)."""
    from .models import tiny_experts

    try:
        return tiny_experts()
    except FileNotFoundError:
        return {}


def expert_path(what: str = "expert file or folder"):
    """An expert file or folder that exists, or the name of one shipped for the bundled model
    (``arith``, ``classify`` ...: its path; a path that exists wins)."""
    def parse(text: str) -> str:
        if Path(text).exists():
            return text
        shipped = shipped_experts()
        if text in shipped:
            return str(shipped[text])
        known = f" (or the name of a shipped expert: {', '.join(shipped)})" if shipped else ""
        raise argparse.ArgumentTypeError(f"{what} {text!r} does not exist{known}")
    parse.__name__ = what
    return parse


def choice_or_named(choices, prefix: str):
    """One of ``choices`` or ``PREFIX:NAME`` with a non-empty NAME (``--strategy expert:arith``,
    ``--adapt profile:fast``)."""
    def parse(text: str) -> str:
        if text in choices or (text.startswith(f"{prefix}:") and len(text) > len(prefix) + 1):
            return text
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)} or "
                                         f"{prefix}:NAME, got {text!r}")
    parse.__name__ = f"one of {', '.join(choices)} or {prefix}:NAME"
    return parse


def model_spec(text: str) -> str:
    """``tiny``, ``random[:SEED[:LAYERS]]`` or a local Hugging Face model folder."""
    why = ("'tiny', 'random[:SEED[:LAYERS]]' (integers, LAYERS >= 1) or a model folder "
           "holding config.json")
    if text == "tiny":
        return text
    if text == "random" or text.startswith("random:"):
        parts = text.split(":")[1:]
        try:
            ok = len(parts) <= 2 and (not parts or not parts[0] or int(parts[0]) >= 0) and \
                (len(parts) < 2 or int(parts[1]) >= 1)
        except ValueError:
            ok = False
        if not ok:
            raise _bad(why, text)
        return text
    if not (Path(text) / "config.json").is_file():
        raise _bad(why, text)
    return text


def parse_random(spec: str) -> tuple[int, dict]:
    """(seed, config overrides) of a checked ``random[:SEED[:LAYERS]]`` model spec."""
    parts = spec.split(":")[1:]
    seed = int(parts[0]) if parts and parts[0] else 0
    return seed, ({"num_hidden_layers": int(parts[1])} if len(parts) > 1 else {})


def device(text: str) -> str:
    """A torch device that this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``..."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise _bad("a torch device such as cpu, cuda or cuda:1", text) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available (torch {torch.__version__} "
                f"{'has no CUDA build' if torch.version.cuda is None else 'sees no GPU'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not backend.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no such device here")
    return text


def attention(text: str) -> str:
    """A Hugging Face attention implementation; ``flash_attention_2`` needs flash-attn."""
    if text not in ATTENTION:
        raise _bad(f"one of {', '.join(ATTENTION)}", text)
    if text == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise argparse.ArgumentTypeError(
            "'flash_attention_2' needs the flash-attn package (pip install flash-attn, on a "
            "CUDA machine); use sdpa or eager without it")
    return text


def check_model_placement(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations of ``--device``, ``--dtype`` and ``--attn`` no model can run in (argparse
    error, exit 2)."""
    if getattr(args, "attn", None) == "flash_attention_2":
        if not str(args.device).startswith("cuda"):
            parser.error(f"argument --attn: flash_attention_2 runs on CUDA only; got --device "
                         f"{args.device}")
        if args.dtype == "float32":
            parser.error("argument --attn: flash_attention_2 needs --dtype bfloat16 or float16")


def task_name(text: str) -> str:
    """A task :func:`t2fast.tasks.get_task` knows (a bundled family or ``KIND:FILE.jsonl``)."""
    from .tasks import get_task
    try:
        get_task(text)
    except KeyError as exc:
        raise argparse.ArgumentTypeError(exc.args[0]) from None
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text
