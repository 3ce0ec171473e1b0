"""Run a test function in N processes over gloo on CPU: `run_distributed(fn, world_size, *args)`.

`fn(rank, world_size, *args)` must be a module-level function (it is pickled into spawned processes). Each process
joins a fresh gloo group on a free localhost port; the return values come back as a list ordered by rank, and the
first failure is re-raised in the parent with the rank's traceback.
"""

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, collected):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        dist.barrier()  # without it, 4-process runs sometimes abort at exit after finishing their work
        results.put((rank, True, value))
        # tensors travel through shared memory owned by this process: stay alive until the parent has them
        collected.wait(timeout=120)
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    results, collected = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, collected)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [outcome[r] for r in range(world_size)]
