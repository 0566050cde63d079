"""Timing for the SVF benchmarks and the tuner: L2-cold weights, CUDA graphs, medians.

On a CUDA device a measured call runs over ``copies`` distinct copies of its weights (enough
that together they exceed L2 several times), all captured in one CUDA graph after a warm-up;
each replay is timed with CUDA events and the result is the median over replays divided by the
number of copies. On the CPU (Triton's interpreter) it is a wall-clock median: it checks that a
script works and says nothing about GPU speed.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

CUDA = torch.cuda.is_available()


def l2_cold_copies(bytes_per_copy: int, factor: float = 3.0, cap: int = 64) -> int:
    """How many weight copies make a rotation ``factor`` × the GPU's L2 (2 on the CPU)."""
    if not CUDA:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(cap, math.ceil(factor * l2 / max(1, bytes_per_copy))))


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file, then a rename), so a
    benchmark stopped by its time limit leaves its last complete results."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def device_tag(device_name: str) -> str:
    """A file-name form of a device name ("NVIDIA H100 80GB HBM3" → "nvidia-h100-80gb-hbm3")."""
    return "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()


def capture_graph(fn, warmup: int = 2):
    """Run ``fn`` ``warmup`` times on a side stream (compiles, allocator pools), then capture one
    call in a CUDA graph; returns (graph, fn's output inside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_us(calls, reps: int = 30) -> float:
    """Median microseconds of one call, ``calls`` being one zero-argument callable per copy."""
    if not CUDA:
        for c in calls:
            c()
        times = []
        for _ in range(max(3, reps // 10)):
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t0) * 1e6 / len(calls))
        return statistics.median(times)
    graph, _ = capture_graph(lambda: [c() for c in calls])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def ceilings(small: bool = False) -> dict:
    """Measured device-to-device copy bandwidth (GB/s) and dense GEMM rate (TFLOP/s)."""
    device = "cuda" if CUDA else "cpu"
    n = (1 << 22) if small or not CUDA else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_us = time_us([lambda: b.copy_(a)])
    k = 256 if small or not CUDA else 8192
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(k, k, device=device, dtype=dtype)
    w = torch.randn(k, k, device=device, dtype=dtype)
    gemm_us = time_us([lambda: x @ w])
    return {"copy_GBps": 2 * n / copy_us / 1e3, "gemm_TFLOPs": 2 * k ** 3 / gemm_us / 1e6,
            "gemm_dtype": str(dtype).replace("torch.", "")}


def alternating_order(names: list, reps: int) -> list:
    """The order in which :func:`time_alternating` measures: ``reps`` rounds, each visiting every
    candidate once, the starting candidate rotating from round to round (so drift in clocks or
    temperature spreads over all candidates instead of favouring one)."""
    order = []
    for rep in range(reps):
        k = rep % len(names)
        order.extend(names[k:] + names[:k])
    return order


def time_alternating(calls: dict, reps: int = 15) -> dict:
    """Median microseconds of one call for each candidate ``name → [callable per copy]``,
    measured in alternating rounds (:func:`alternating_order`), each candidate in its own CUDA
    graph over L2-cold copies (wall clock on the CPU)."""
    names = list(calls)
    if CUDA:
        graphs = {name: capture_graph(lambda fns=fns: [f() for f in fns])[0]
                  for name, fns in calls.items()}
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once(name):
        if not CUDA:
            t0 = time.perf_counter()
            for f in calls[name]:
                f()
            return (time.perf_counter() - t0) * 1e6 / len(calls[name])
        start.record()
        graphs[name].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / len(calls[name])

    times = {name: [] for name in names}
    for name in alternating_order(names, reps):
        times[name].append(once(name))
    return {name: statistics.median(t) for name, t in times.items()}
