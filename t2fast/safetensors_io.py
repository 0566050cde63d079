"""Reading and writing t2fast's safetensors files, with errors that say what is wrong.

t2fast reads its files (experts, SVD cache entries) itself rather than through ``safe_open``, so
that it can check everything the header declares before it reads any tensor data:

- the header is at most ``MAX_HEADER_BYTES`` of JSON with no key twice at any level (a
  duplicated metadata ``name`` is an error, not "the last one wins"), metadata values are
  strings, and ``*_json`` metadata entries hold JSON (also without duplicate keys);
- every tensor's dtype is one the caller accepts, its byte range matches its shape, the ranges
  tile the data exactly, and the data is at most the caller's ``max_bytes``;
- the caller's ``check`` sees ``{name: TensorInfo}`` and the metadata (the shapes against the
  model, say) before the data is read.

Errors are :class:`T2FileError` naming the file; a file that does not exist, a folder and a file
this process may not read ("permission denied") are told apart.

Files are written to a temporary file beside the target and renamed over it (readers never see
half a file; nothing is left behind when writing fails), with the usual umask-respecting mode
(0644 under umask 022).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as serialize

from .messages import shown

MAX_HEADER_BYTES = 16 << 20     # the JSON header of any t2fast file (tens of KB in practice)

#: safetensors dtype names → torch dtypes t2fast can read.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class T2FileError(ValueError):
    """A t2fast file (expert, bank, decomposition) is missing, corrupt or does not match."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it: dtype, shape, byte range in the data section."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def strict_json(text: str, what: str):
    """``json.loads`` that refuses a key given twice in one object (``what`` names the text in
    the error) and JSON nested too deep to parse."""
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise T2FileError(f"{what} gives the key {shown(k)} twice")
            out[k] = v
        return out
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise T2FileError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise T2FileError(f"{what} is JSON nested too deeply") from None


def _open(path: Path, where: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise T2FileError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise T2FileError(f"{where} is a folder, not a file") from None
    except PermissionError:
        raise T2FileError(f"{where} cannot be read: permission denied") from None
    except OSError as exc:
        raise T2FileError(f"{where} cannot be read: {exc.strerror or exc}") from None


def _tensor_info(name: str, entry, where: str) -> TensorInfo:
    ok = isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
    dtype = DTYPES.get(entry.get("dtype")) if ok and isinstance(entry["dtype"], str) else None
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ints = (lambda xs: isinstance(xs, list) and
            all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs))
    if dtype is None or not ints(shape) or not ints(offsets) or len(offsets) != 2 or \
            offsets[0] > offsets[1]:
        raise T2FileError(f"{where}: the header's entry for tensor {shown(name)} is not "
                          f"{{dtype: one of {sorted(DTYPES)}, shape: [ints >= 0], "
                          f"data_offsets: [begin, end]}}: {shown(entry)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise T2FileError(f"{where}: tensor {shown(name)} of shape {shown(shape)} "
                          f"{entry['dtype']} needs {nbytes} bytes, the header gives it "
                          f"{offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _header(f, size: int, where: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse the header of an open file of ``size`` bytes: ``(tensors, metadata, data start)``."""
    head = f.read(8)
    if len(head) < 8:
        raise T2FileError(f"{where} is not a safetensors file (truncated: {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        if head.startswith((b"PK\x03\x04", *(bytes([0x80, p]) for p in range(2, 6)))):
            raise T2FileError(f"{where} is a zip or pickle file (torch.save's formats), not a "
                              f"safetensors file; an official Transformer² expert (.pt) is "
                              f"converted by t2fast import-official")
        raise T2FileError(f"{where} is not a readable safetensors file (truncated or corrupt?): "
                          f"its header claims {n} bytes (file: {size} bytes, limit: "
                          f"{MAX_HEADER_BYTES})")
    try:
        text = f.read(n).decode("utf-8")
    except UnicodeDecodeError:
        raise T2FileError(f"{where}: the safetensors header is not UTF-8 text") from None
    header = strict_json(text, f"{where}: the safetensors header")
    if not isinstance(header, dict):
        raise T2FileError(f"{where}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise T2FileError(f"{where}: the header's __metadata__ is not an object of strings")
    infos = {k: _tensor_info(k, v, where) for k, v in header.items()}
    end = 0
    for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
        if info.start != end:
            raise T2FileError(f"{where}: the tensors' byte ranges overlap or leave gaps (at "
                              f"{shown(name)}): the file is corrupt")
        end = info.stop
    if end != size - 8 - n:
        raise T2FileError(f"{where} is not a readable safetensors file (truncated or corrupt?): "
                          f"the header declares {end} bytes of tensor data, the file holds "
                          f"{size - 8 - n}")
    return infos, meta, 8 + n


def _metadata(meta: dict, where: str, kind: str, fmt: str, versions: tuple[str, ...]) -> dict:
    """Check format and version; decode the ``*_json`` entries (``key_json`` → ``key``)."""
    if meta.get("format") != fmt:
        raise T2FileError(f"{where} is not a t2fast {kind} file: metadata format is "
                          f"{shown(meta.get('format'))}, expected {fmt!r}")
    if meta.get("format_version") not in versions:
        raise T2FileError(f"{where} has format_version {shown(meta.get('format_version'))}; "
                          f"this t2fast reads {versions}")
    out = {}
    for key, value in meta.items():
        if key.endswith("_json"):
            if key[:-5] in meta:
                raise T2FileError(f"{where}: metadata gives both {key[:-5]!r} and {key!r}")
            out[key[:-5]] = strict_json(value, f"{where}: metadata {key[:80]}")
        else:
            out[key] = value
    return out


def read_file(path, kind: str, fmt: str, versions: tuple[str, ...], *,
              dtypes: tuple[torch.dtype, ...] = (torch.float32,), max_bytes: int,
              check: Callable[[dict[str, TensorInfo], dict], None] | None = None):
    """Read every tensor and the metadata of a t2fast safetensors file.

    Args:
        path: the file.
        kind: what it is, for messages ("expert", "decomposition").
        fmt, versions: the metadata ``format`` it must declare and the ``format_version``\\ s
            this t2fast reads.
        dtypes: the tensor dtypes accepted.
        max_bytes: the most tensor data the file may hold.
        check: called with ``({name: TensorInfo}, metadata)`` before any tensor data is read;
            raises :class:`T2FileError` when the header does not fit what the caller expects.
    Returns:
        ``(tensors, metadata)``: tensors in the file's dtypes on the CPU, metadata with the
        ``*_json`` entries decoded (``shapes_json`` → ``shapes``).
    Raises:
        T2FileError naming the file and the problem (see the module docstring).
    """
    path = Path(path)
    where = f"{kind} file {str(path)!r}"
    with _open(path, where) as f:
        size = os.fstat(f.fileno()).st_size
        infos, raw_meta, data_start = _header(f, size, where)
        meta = _metadata(raw_meta, where, kind, fmt, versions)
        bad = {n: i.dtype for n, i in infos.items() if i.dtype not in dtypes}
        if bad:
            name, dtype = next(iter(bad.items()))
            raise T2FileError(f"{where}: tensor {shown(name)} is {dtype}; {kind} files hold "
                              f"{', '.join(str(d) for d in dtypes)}")
        if check is not None:
            check(infos, meta)
        total = size - data_start
        if total > max_bytes:
            raise T2FileError(f"{where} declares {total} bytes of tensor data, more than a "
                              f"{kind} file may hold ({max_bytes})")
        # each tensor read straight into its own storage, in file order (the ranges tile
        # the data section): no second copy, and no tensor keeps the others' bytes alive
        tensors = {}
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
            t = torch.empty(info.shape, dtype=info.dtype)
            if t.numel() and f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != \
                    info.stop - info.start:
                raise T2FileError(f"{where} changed while it was read")
            tensors[name] = t
    tensors = {name: tensors[name] for name in infos}       # the header's order
    return tensors, meta


def read_header(path, kind: str, fmt: str, versions: tuple[str, ...]
                ) -> tuple[dict[str, TensorInfo], dict]:
    """``({name: TensorInfo}, metadata)`` of a t2fast safetensors file, reading no tensor data
    (checked as :func:`read_file` checks it)."""
    path = Path(path)
    where = f"{kind} file {str(path)!r}"
    with _open(path, where) as f:
        infos, raw_meta, _ = _header(f, os.fstat(f.fileno()).st_size, where)
    return infos, _metadata(raw_meta, where, kind, fmt, versions)


def read_json(path, what: str, max_bytes: int = 1 << 20):
    """The JSON value of a small text file (``what`` names it in errors): at most ``max_bytes``,
    UTF-8, no key twice in one object."""
    with _open(Path(path), what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise T2FileError(f"{what} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise T2FileError(f"{what} is not UTF-8 text") from None
    return strict_json(text, what)


def write_file(path, tensors: dict[str, torch.Tensor], fmt: str, version: str,
               metadata: dict) -> Path:
    """Write tensors (made contiguous, on CPU) with ``format``/``format_version`` metadata.

    Non-string metadata values are stored as JSON under ``<key>_json``. The file is written
    beside ``path`` under a unique temporary name and renamed over ``path``; on any failure the
    temporary file is removed and the error (an ``OSError`` for the file system's) propagates.
    """
    path = Path(path)
    meta = {"format": fmt, "format_version": version}
    for k, v in metadata.items():
        if isinstance(v, str):
            meta[k] = v
        else:
            meta[f"{k}_json"] = json.dumps(v)
    blob = serialize({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                     metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique temporary name: several processes may write the same cache entry at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:              # mode 0666 less the umask, as any new file
            f.write(blob)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
