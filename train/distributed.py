"""World-level helpers: start/stop the default process group, agree on a value, agree on a flag.

The parallel layout (meshes, sub-groups) belongs to `latentforge.train.parallel`; these only touch the whole world, for things
every rank must agree on (the run's W&B id, a stop request) whatever the layout.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(timeout_minutes: float = 30) -> None:
    """Join the launched world (torchrun's env): NCCL with CUDA, gloo on CPU. A single process stays plain."""
    if is_distributed() or launched_world_size() == 1:
        return
    device = training_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cpu:gloo too: object collectives and async checkpoint staging may run on CPU tensors
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def shutdown_distributed() -> None:
    if is_distributed():
        dist.barrier()  # without it, multi-process gloo runs sometimes abort at exit after finishing their work
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """`value` from rank `src` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. one rank got SIGTERM)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=training_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
