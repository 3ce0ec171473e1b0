"""Host <-> device traffic of the engine, kept to what a step needs so the host never waits on the device per token.

On CUDA a plain copy waits for the device: `tensor.tolist()` / `.item()` / `bool(tensor)` wait for every queued
kernel, and so does a host -> device copy from pageable memory (`torch.tensor(list, device=...)`). The engine
therefore builds its per-step indices on the host and sends them with `to_device` (pinned staging, asynchronous),
and reads back once per step with `to_host`: every tensor the host needs from that step, copied together after one
wait. Elsewhere in a step nothing reads device values (tests/model/test_engine_host_reads.py counts the reads).
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (nested lists or a CPU tensor) on `device`, without waiting for the device's queue."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    # pinned staging: the copy is queued behind the running kernels instead of blocking the host until they end
    return host.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies of `tensors` after one wait for the device (the step's single read-back)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return copies
