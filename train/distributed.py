"""World-level helpers: start/stop the default process group, agree on a value, agree on a flag.

The parallel layout (meshes, sub-groups) belongs to `latentforge.train.parallel`; these only touch the whole world, for things
every rank must agree on (the run's W&B id, a stop request) whatever the layout.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys

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


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent (torchrun's agent) dies, however it dies.
    torchrun starts workers in sessions of their own, so `kill -9` of its process group would leave them training
    (and writing checkpoints a relaunch then collides with). Returns whether it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died while we armed it: the kernel won't tell us
        os.kill(os.getpid(), sig)
    # (killed before this ran at all, a worker finds no agent store to join and fails at init_process_group)
    return True


def init_distributed(timeout_minutes: float = 30) -> None:
    """Join the launched world (torchrun's env): NCCL with CUDA, gloo on CPU. A single process stays plain.
    A torchrun worker also arranges to die with its agent (`die_with_parent`)."""
    if launched_by_torchrun():
        die_with_parent()
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


def all_gather_object(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
