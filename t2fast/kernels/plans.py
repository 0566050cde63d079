"""Launch plans for the SVF kernels: shipped tables, nearest-key lookup, a heuristic.

A *plan* fixes, for one op (a matrix, or a group of matrices reading one input: Σ m_i outputs,
n inputs, total rank R) and one token count T, the tile config of the shrink (``h = S ⊙ z ⊙
(x Vhᵀ)``, a [T, R] GEMM over n) and of the grouped expand (``y_i = h_i U_iᵀ``, [T, Σ m_i] over
r_i), and which backend ``backend="auto"`` uses there. No autotuning runs on a user's hot path: a
plan comes from

1. the table shipped for the GPU architecture (``configs/<arch>.json``, e.g. ``sm90.json`` for
   H100/H200), written by ``bench/tune_svf.py`` (see ``configs/README.md``): the entry of the
   T bucket (the smallest bucket ≥ T, else the largest) and of the nearest shape (log-distance
   in m and n);
2. otherwise :func:`heuristic_plan`.

Two families of plans:

* **deterministic** (the default): batch-invariant. No reduction is ever split, every bucket of
  an op uses the same ``block_k`` and the same MMA instruction family (``wgmma``: ``block_m`` ≥
  64 with a multiple of 4 warps, for bf16/fp16), and the backend is the Triton kernels at every
  T: a row's output is then one fixed chain of k-blocks, bit-identical whatever the other rows
  and whatever T (:func:`reduction_order` is constant across buckets; checked in the tests).
  Decode launches fill the GPU with narrow N tiles (``block_n`` down to 16), not with splits.
  Only table entries marked ``"deterministic": true`` (whose tiles keep that order) serve here.
* **order-dependent** (``deterministic=False``, an explicit opt-in): any table entry, its
  backend per bucket (the torch composition where it measured faster), and split-K shrinks with
  fp32 atomics at decode, whose sums vary in the last bits with scheduling.

Plans depend on T only through its bucket, so a shape compiles at most one binary per bucket and
op. The first call on a new shape costs compilation only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TABLE_FORMAT = 1
# Token buckets of the tables: a plan is chosen for the smallest bucket >= T.
T_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DECODE_MAX_T = 64
# Programs each launch should reach, per SM: two at decode (two resident CTAs hide memory
# latency), one wave beyond it (large tiles; splitting them would add fp32 atomics and a memset).
DECODE_PROGRAMS_PER_SM = 2
MAX_SPLIT = 32
BACKEND_CHOICES = ("triton", "torch")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def t_bucket(T: int) -> int:
    """The table bucket of a token count: the smallest of :data:`T_BUCKETS` ≥ T, else the last."""
    for b in T_BUCKETS:
        if T <= b:
            return b
    return T_BUCKETS[-1]


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one GEMM ``out[M, N] = A[M, K] @ B[K, N]`` (M = tokens).

    ``block_m`` ≥ 16 (tokens, padded: ``tl.dot`` needs 16), ``block_n`` / ``block_k`` ≥ 16,
    all powers of two; ``split_k`` programs share each output tile's reduction.
    """
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v!r}")
        for name in ("split_k", "group_m", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"TileConfig.{name} must be a positive int, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps must be 1, 2, 4, 8 or 16, got "
                             f"{self.num_warps}")

    def meta(self, split: bool = True) -> dict:
        """The kernel's constexpr block arguments (``split=False``: without ``SPLIT_K``, for a
        kernel that never splits its reduction, the grouped expand)."""
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m)
        return dict(meta, SPLIT_K=self.split_k) if split else meta

    def tiles(self, M: int, N: int) -> int:
        return cdiv(M, self.block_m) * cdiv(N, self.block_n)

    def grid(self, M: int, N: int) -> tuple[int, int]:
        return (self.tiles(M, N), self.split_k)

    def programs(self, M: int, N: int) -> int:
        return self.tiles(M, N) * self.split_k

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TileConfig":
        fields = set(cls.__dataclass_fields__)
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"{where}: unknown tile field(s) {sorted(unknown)}; expected "
                             f"{sorted(fields)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class SVFPlan:
    """How one SVF matmul runs: shrink and expand tiles, and the backend ``auto`` picks.

    ``source`` says where the plan came from (``"table:sm90.json"``, ``"heuristic"``,
    ``"interpreter"``, ``"given"``).
    """
    shrink: TileConfig
    expand: TileConfig
    backend: str = "triton"
    source: str = "given"

    def h_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """``h`` is fp32 when the shrink splits (atomics) or for fp32 inputs, else x's dtype."""
        return torch.float32 if self.shrink.split_k > 1 or x_dtype == torch.float32 else x_dtype

    def launches(self, T: int, ms, r: int) -> list[tuple[str, int]]:
        """The kernels of one call and the programs that do work in each (a memset counts as a
        launch); ``ms`` is the output size m, or the list of a group's slice sizes m_i."""
        ms = [ms] if isinstance(ms, int) else list(ms)
        out = []
        if self.shrink.split_k > 1:
            out.append(("memset h", 1))
        out.append(("shrink", self.shrink.programs(T, r)))
        out.append(("expand", sum(self.expand.programs(T, m) for m in ms)))
        return out


# Tile of the split-sum kernel (rows, columns).
SPLIT_SUM_BLOCK = (16, 256)

# Interpreter (CPU tests): small blocks keep the numpy emulation fast.
INTERPRETER_PLAN = SVFPlan(TileConfig(16, 32, 32, group_m=4), TileConfig(16, 32, 32, group_m=4),
                           source="interpreter")


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(v - 1).bit_length()))


def gemm_tile(T: int, dtype: torch.dtype) -> TileConfig:
    """Unsplit tiles for a GEMM with T rows (tokens) in ``dtype``."""
    T = _pow2_at_least(T)
    if dtype == torch.float32:       # IEEE fp32 dots: no tensor cores, keep register tiles small
        return TileConfig(min(64, T), 64, 32, num_warps=4, num_stages=2)
    if T <= DECODE_MAX_T:            # memory-bound: one row tile, long k-blocks, deep pipeline
        return TileConfig(T, 64, 128, num_warps=4, num_stages=4 if T == 16 else 3)
    if T <= 256:
        return TileConfig(64, 128, 64, num_warps=4, num_stages=4)
    return TileConfig(128, 128, 64, num_warps=8, num_stages=3)


def fill_gpu(cfg: TileConfig, M: int, N: int, K: int, num_sms: int,
             split: bool = True) -> TileConfig:
    """Widen a launch until it fills the GPU: the target is ``2 × num_sms`` programs for
    decode-sized M (≤ 64 tokens), ``num_sms`` beyond; a launch already wide enough is returned
    unchanged.

    ``split=False`` (deterministic plans, and every expand): narrow ``block_n`` down to 16 and
    nothing else, so the reduction order stays what it was. ``split=True``: split K, then narrow
    ``block_n`` (to 16) and ``block_k`` (to 32); splits keep at least one k-block per split and
    stay ≤ :data:`MAX_SPLIT` (the split a table gives is kept as the minimum).
    """
    target = (DECODE_PROGRAMS_PER_SM if M <= DECODE_MAX_T else 1) * num_sms
    if not split:
        cfg = replace(cfg, split_k=1)
        while cfg.programs(M, N) < target and cfg.block_n > 16:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        return cfg

    def best_split(c):
        k_blocks = cdiv(K, c.block_k)
        s = c.split_k
        while c.tiles(M, N) * s < target and s * 2 <= min(k_blocks, MAX_SPLIT):
            s *= 2
        return replace(c, split_k=min(s, max(1, k_blocks)))

    cfg = best_split(cfg)
    while cfg.programs(M, N) < target and cfg.block_n > 16:
        cfg = best_split(replace(cfg, block_n=cfg.block_n // 2, split_k=1))
    while cfg.programs(M, N) < target and cfg.block_k > 32:
        cfg = best_split(replace(cfg, block_k=cfg.block_k // 2, split_k=1))
    return cfg


# Largest token bucket whose order-dependent heuristic plan runs the Triton kernels under
# ``backend="auto"``. On an H100 the (single-matrix, split-K) kernels beat the torch composition
# at every Llama-3-8B shape in bucket 16 and lost to it at 64 tokens (3 of 4 shapes) and 4096
# (all), by the tuner (bench/results/, bench/NOTES.md).
HEURISTIC_TRITON_MAX_T = 16
# The reduction block of every deterministic bf16/fp16 plan, at every bucket.
DETERMINISTIC_BLOCK_K = 128
HALF_DTYPES = (torch.float16, torch.bfloat16)


def reduction_order(tile: TileConfig, dtype: torch.dtype) -> tuple:
    """What fixes the order in which a row's products are summed: the split of the reduction,
    the k-block, and the dot instruction family (``wgmma`` for bf16/fp16 tiles of ≥ 64 rows and
    a multiple of 4 warps, ``mma.sync`` below, FMA for IEEE fp32). Equal orders give a row
    bit-identical sums whatever the other rows of its tile."""
    if dtype not in HALF_DTYPES:
        family = "fma"
    elif tile.block_m >= 64 and tile.num_warps % 4 == 0:
        family = "wgmma"
    else:
        family = "mma"
    return tile.split_k, tile.block_k, family


def deterministic_tile(T: int, dtype: torch.dtype) -> TileConfig:
    """The unsplit tile of a deterministic plan for a bucket of T tokens (before N narrowing):
    one ``block_k`` and the ``wgmma`` family at every bucket for bf16/fp16."""
    T = _pow2_at_least(T)
    if dtype not in HALF_DTYPES:
        return gemm_tile(T, dtype)
    if T <= DECODE_MAX_T:            # memory-bound: padded 64-row tile, deep pipeline
        return TileConfig(64, 64, DETERMINISTIC_BLOCK_K, num_warps=4, num_stages=4)
    if T <= 256:
        return TileConfig(64, 128, DETERMINISTIC_BLOCK_K, num_warps=4, num_stages=3)
    return TileConfig(128, 128, DETERMINISTIC_BLOCK_K, num_warps=8, num_stages=3)


def heuristic_plan(T: int, m: int, n: int, r: int, dtype: torch.dtype, num_sms: int,
                   deterministic: bool = True) -> SVFPlan:
    """The plan used where no table entry exists (see the module docstring).

    Deterministic: :func:`deterministic_tile` for both ops, widened by narrow N tiles, backend
    Triton. Order-dependent: the unsplit GEMM tiles of :func:`gemm_tile`, the shrink split to
    fill the GPU at decode, backend Triton up to :data:`HEURISTIC_TRITON_MAX_T` tokens and the
    torch composition beyond.
    """
    Tb = _pow2_at_least(T)
    if deterministic:
        tile = deterministic_tile(Tb, dtype)
        # the shrink's epilogue holds a second [block_m, block_n] fp32 tile (z): at most 64
        # columns keep the α-mixing variant free of spills on sm_90
        shrink = replace(tile, block_n=min(tile.block_n, 64))
        return SVFPlan(fill_gpu(shrink, Tb, r, n, num_sms, split=False),
                       fill_gpu(tile, Tb, m, r, num_sms, split=False), source="heuristic")
    shrink = gemm_tile(Tb, dtype)
    expand = gemm_tile(Tb, dtype)
    if dtype != torch.float32 and Tb <= DECODE_MAX_T:
        # the expand streams U with an fp32 h tile: narrower columns than the shrink (and
        # shorter k-blocks at 32 tokens, where 32x128 fp32 tiles spill on sm_90)
        expand = replace(expand, block_n=32, block_k=64 if Tb == 32 else 128)
    return SVFPlan(fill_gpu(shrink, Tb, r, n, num_sms), fill_gpu(expand, Tb, m, r, num_sms,
                                                                 split=False),
                   backend="triton" if Tb <= HEURISTIC_TRITON_MAX_T else "torch",
                   source="heuristic")


# ---------------------------------------------------------------- shipped tables

@dataclass(frozen=True)
class TableEntry:
    t: int
    m: int
    n: int
    plan: SVFPlan
    tuned: bool = False      # measured on the table's GPU (else the heuristic's plan)
    deterministic: bool = False   # a batch-invariant plan (see the module docstring)


def parse_table(data: dict, where: str) -> list[TableEntry]:
    """Check a config table (the JSON written by ``bench/tune_svf.py``) and return its entries."""
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{where}: not a t2fast kernel config table of format {TABLE_FORMAT} "
                         f"(got format {data.get('format') if isinstance(data, dict) else None!r})")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'entries' must be a non-empty list")
    out = []
    for i, e in enumerate(entries):
        at = f"{where}: entries[{i}]"
        missing = {"t", "m", "n", "shrink", "expand", "backend"} - set(e)
        if missing:
            raise ValueError(f"{at} lacks {sorted(missing)}")
        if e["t"] not in T_BUCKETS:
            raise ValueError(f"{at}: t = {e['t']!r} is not one of the buckets {T_BUCKETS}")
        if e["backend"] not in BACKEND_CHOICES:
            raise ValueError(f"{at}: backend must be one of {BACKEND_CHOICES}, got "
                             f"{e['backend']!r}")
        plan = SVFPlan(TileConfig.from_dict(e["shrink"], f"{at}.shrink"),
                       TileConfig.from_dict(e["expand"], f"{at}.expand"),
                       backend=e["backend"], source=f"table:{Path(where).name}")
        tuned = e.get("tuned", data.get("tuned", False))
        det = e.get("deterministic", False)
        for name, v in (("tuned", tuned), ("deterministic", det)):
            if not isinstance(v, bool):
                raise ValueError(f"{at}: {name} must be true or false, got {v!r}")
        if det:
            check_deterministic(plan, torch.bfloat16, at)
        out.append(TableEntry(int(e["t"]), int(e["m"]), int(e["n"]), plan, tuned, det))
    return out


def check_deterministic(plan: SVFPlan, dtype: torch.dtype, where: str) -> None:
    """Raise unless ``plan`` has the reduction order of the deterministic heuristic at every
    bucket (Triton backend, no split, :data:`DETERMINISTIC_BLOCK_K`, the same dot family)."""
    want = reduction_order(deterministic_tile(16, dtype), dtype)
    for op, tile in (("shrink", plan.shrink), ("expand", plan.expand)):
        got = reduction_order(tile, dtype)
        if got != want:
            raise ValueError(f"{where}: a deterministic entry's {op} must keep the reduction "
                             f"order (split_k, block_k, dot family) = {want}, got {got}")
    if plan.backend != "triton":
        raise ValueError(f"{where}: a deterministic entry runs the Triton kernels; backend is "
                         f"{plan.backend!r}")


def table_to_json(entries: list[TableEntry], arch: str, meta: dict) -> dict:
    """The JSON form of a table (inverse of :func:`parse_table`)."""
    rows = [dict(t=e.t, m=e.m, n=e.n, tuned=e.tuned, deterministic=e.deterministic,
                 backend=e.plan.backend,
                 shrink=asdict(e.plan.shrink), expand=asdict(e.plan.expand))
            for e in sorted(entries, key=lambda e: (e.m, e.n, e.t))]
    return dict(format=TABLE_FORMAT, arch=arch, **meta, entries=rows)


@lru_cache(maxsize=None)
def load_table(arch: str) -> tuple[TableEntry, ...]:
    """Entries of the shipped table for ``arch`` (e.g. ``"sm90"``); empty when none ships."""
    path = CONFIG_DIR / f"{arch}.json"
    if not path.exists():
        return ()
    return tuple(parse_table(json.loads(path.read_text()), str(path)))


# A table entry serves shapes within this factor of its own m and n.
NEAREST_MAX_RATIO = 2.0


def lookup(entries, T: int, m: int, n: int, deterministic: bool = False) -> SVFPlan | None:
    """The plan of the T bucket's entry nearest in shape (log-distance in m and n); with
    ``deterministic``, among the entries marked deterministic only.

    None when no entry is left or none lies within :data:`NEAREST_MAX_RATIO` of m and n.
    """
    if deterministic:
        entries = [e for e in entries if e.deterministic]
    if not entries:
        return None
    b = t_bucket(T)
    ts = sorted({e.t for e in entries})
    tb = next((t for t in ts if t >= b), ts[-1])
    near = [e for e in entries if e.t == tb
            and max(e.m / m, m / e.m, e.n / n, n / e.n) <= NEAREST_MAX_RATIO]
    if not near:
        return None
    best = min(near, key=lambda e: (abs(math.log(e.m / m)) + abs(math.log(e.n / n)), e.m, e.n))
    return best.plan


@lru_cache(maxsize=None)
def device_arch(device: torch.device) -> tuple[str, int]:
    """(``"sm90"``-style architecture name, number of SMs) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return f"sm{props.major}{props.minor}", props.multi_processor_count


@lru_cache(maxsize=4096)
def plan_for(Tb: int, m: int, n: int, r: int, dtype: torch.dtype, arch: str,
             num_sms: int, deterministic: bool = True) -> SVFPlan:
    """The plan for a token bucket ``Tb`` (a power of two ≥ 16; see :func:`plan`)."""
    found = (lookup(load_table(arch), Tb, m, n, deterministic) if dtype in HALF_DTYPES
             else None)
    if found is None:
        return heuristic_plan(Tb, m, n, r, dtype, num_sms, deterministic)
    return replace(found, shrink=fill_gpu(found.shrink, Tb, r, n, num_sms,
                                          split=not deterministic),
                   expand=fill_gpu(found.expand, Tb, m, r, num_sms, split=False))


def plan(T: int, m: int, n: int, r: int, dtype: torch.dtype, device: torch.device,
         deterministic: bool = True) -> SVFPlan:
    """The plan for T tokens through an op of m outputs (Σ m_i for a group), n inputs and rank
    r (R) in ``dtype`` on ``device``.

    Under Triton's interpreter (CPU) this is :data:`INTERPRETER_PLAN`; on CUDA the shipped table
    of the device's architecture, else :func:`heuristic_plan`. Cached per T bucket.
    """
    if device.type != "cuda":
        return INTERPRETER_PLAN
    arch, sms = device_arch(device)
    return plan_for(t_bucket(T) if T <= T_BUCKETS[-1] else _pow2_at_least(T), m, n, r, dtype,
                    arch, sms, deterministic)
