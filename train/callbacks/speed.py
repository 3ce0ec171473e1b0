"""Throughput, TFLOP/s, MFU, memory and ETA, added to each step's metrics."""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Optional, Union

import torch

from ..flops import device_peak_tflops
from .base import Callback


def process_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


FlopsPerToken = Union[float, Callable[[int], float]]


class SpeedMonitor(Callback):
    """tokens/s over the whole world and per device; TFLOP/s and MFU per device (n/a = None on CPU).

    `flops_per_token` is a number, or a function of the sequence length (attention's cost per token grows with
    it): then each step is counted at its own `seq_len` (train.seq_len_schedule changes it from step to step)."""

    order = 10

    def __init__(self, flops_per_token: FlopsPerToken, device: torch.device, world_size: int, window: int = 20):
        self.flops_per_token = flops_per_token
        self.device = device
        self.world_size = world_size
        self.peak_tflops = device_peak_tflops(device)
        self.step_times = deque(maxlen=window)

    def step_flops_per_token(self, metrics: dict) -> float:
        if callable(self.flops_per_token):
            return self.flops_per_token(int(metrics["seq_len"]))
        return self.flops_per_token

    def on_step_end(self, trainer, metrics: dict) -> None:
        step_time = metrics["step_time"]
        self.step_times.append(step_time)
        tokens_per_s = metrics["tokens"] / step_time if step_time > 0 else float("nan")
        metrics["tokens_per_s"] = tokens_per_s
        metrics["tokens_per_s_per_device"] = tokens_per_s / self.world_size
        if self.device.type == "cuda":
            tflops = self.step_flops_per_token(metrics) * tokens_per_s / self.world_size / 1e12
            metrics["tflops_per_device"] = tflops
            metrics["mfu"] = tflops / self.peak_tflops if self.peak_tflops else None
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            metrics["tflops_per_device"] = None
            metrics["mfu"] = None
            rss = process_rss_bytes()
            metrics["memory_gib"] = rss / 2**30 if rss is not None else None
        remaining = trainer.last_step - metrics["step"]
        mean_step = sum(self.step_times) / len(self.step_times)
        metrics["eta_s"] = remaining * mean_step
