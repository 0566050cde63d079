"""Reading t2fast's safetensors files with errors that say what is wrong with the file."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class T2FileError(ValueError):
    """A t2fast file (expert, bank, decomposition) is missing, corrupt or does not match."""


def read_file(path, kind: str, fmt: str, versions: tuple[str, ...]):
    """Load every tensor and the metadata of a t2fast safetensors file.

    Checks that the file exists, parses (a truncated file does not), and that its metadata
    declares ``format == fmt`` with a supported ``format_version``. JSON-valued metadata
    entries (keys ending in ``_json``) are decoded. Returns ``(tensors, metadata)``.
    """
    path = Path(path)
    if not path.is_file():
        raise T2FileError(f"{kind} file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several error types for bad files
        raise T2FileError(f"{kind} file {str(path)!r} is not a readable safetensors file "
                          f"(truncated or corrupt?): {exc}") from exc
    if meta.get("format") != fmt:
        raise T2FileError(f"{str(path)!r} is not a t2fast {kind} file: metadata format is "
                          f"{meta.get('format')!r}, expected {fmt!r}")
    if meta.get("format_version") not in versions:
        raise T2FileError(f"{kind} file {str(path)!r} has format_version "
                          f"{meta.get('format_version')!r}; this t2fast reads {versions}")
    for key in [k for k in meta if k.endswith("_json")]:
        try:
            meta[key[:-5]] = json.loads(meta.pop(key))
        except json.JSONDecodeError as exc:
            raise T2FileError(f"{kind} file {str(path)!r}: metadata {key} is not valid "
                              f"JSON ({exc})") from exc
    return tensors, meta


def write_file(path, tensors: dict[str, torch.Tensor], fmt: str, version: str,
               metadata: dict) -> Path:
    """Write tensors (made contiguous, on CPU) with ``format``/``format_version`` metadata.

    Non-string metadata values are stored as JSON under ``<key>_json``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "format_version": version}
    for k, v in metadata.items():
        if isinstance(v, str):
            meta[k] = v
        else:
            meta[f"{k}_json"] = json.dumps(v)
    clean = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    # unique temporary name: several processes may write the same cache entry at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    save_file(clean, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
