"""The one timing loop of the bench scripts: median seconds per call of a callable."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` calls of fn() after `warmup` untimed ones. On CUDA each call is timed by events
    recorded around it, so the GPU work it queued counts; on CPU by time.perf_counter."""
    if reps < 1:
        raise ValueError(f"median_seconds: reps must be >= 1, got {reps}")
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]
