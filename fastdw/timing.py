"""Timing helpers shared by the main job and the benchmark suites.

GPU: CUDA events around each call after warm-up, median and p20/p80 over the repeats; callers
rotate input sets so L2 does not hold them. CPU: time.perf_counter around each call.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: List[float]) -> "Timing":
        s = sorted(samples_ms)
        q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
        return cls(statistics.median(s), q[0], q[3], len(s))


def time_cpu(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


def time_cuda(fn: Callable[[], object], repeats: int = 50, warmup: int = 10) -> Timing:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, repeats, warmup)
    return time_cpu(fn, repeats, warmup)
