"""Trainer -> rollout weight transfer: a collective broadcast over a process group of its own.

The group spans trainer rank 0 (group rank 0, the source) and every rollout worker (ranks 1..N). It is not the
trainer's torch.distributed world (the workers are not part of it), so it is built directly from a TCPStore
rendezvous as a standalone ProcessGroupGloo (CPU) or ProcessGroupNCCL (GPU) object, the way RL frameworks attach
inference engines to a trainer. One push = a header (version, layout hash, bucket count) then the tensors packed
into flat per-dtype buckets of at most `bucket_mb`, one broadcast each.

Both sides derive the bucket layout from their own copy of the model's state-dict names, shapes and dtypes; the
hash in the header makes a layout mismatch an error instead of silently scrambled weights.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

Spec = List[Tuple[str, Tuple[int, ...], torch.dtype]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


class WeightSyncGroup:
    """A standalone process group: rank 0 sends, the others receive. `backend`: gloo or nccl."""

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 1800.0
    ):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be gloo or nccl, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        prefixed = dist.PrefixStore("latentforge_weight_sync", self.store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        # torch's stubs give Backend no broadcast; ProcessGroupGloo / ProcessGroupNCCL have it at run time
        self.pg.broadcast([tensor], opts).wait()  # pyright: ignore[reportAttributeAccessIssue]

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - older torch / already down
            pass


def state_spec(state: Dict[str, torch.Tensor]) -> Spec:
    return [(name, tuple(t.shape), t.dtype) for name, t in sorted(state.items())]


def spec_hash(spec: Spec) -> int:
    text = ";".join(f"{n}:{list(s)}:{d}" for n, s, d in spec)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")  # fits in int64


def plan_buckets(spec: Spec, bucket_bytes: int) -> List[List[int]]:
    """Indices into `spec`, grouped into buckets of one dtype and at most `bucket_bytes` (a larger tensor alone)."""
    buckets, current, size, dtype = [], [], 0, None
    for i, (_, shape, dt) in enumerate(spec):
        nbytes = _numel(shape) * torch.empty((), dtype=dt).element_size()
        if current and (dt != dtype or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        dtype = dt
    if current:
        buckets.append(current)
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def send_state(group: WeightSyncGroup, state: Dict[str, torch.Tensor], version: int, bucket_mb: int = 256) -> int:
    """Rank 0: broadcast every tensor of `state`; returns the bytes sent."""
    spec = state_spec(state)
    buckets = plan_buckets(spec, bucket_mb << 20)
    header = torch.tensor([version, spec_hash(spec), len(buckets)], dtype=torch.int64, device=group.device)
    group.broadcast(header)
    sent = 0
    for bucket in buckets:
        flat = torch.cat([state[spec[i][0]].detach().reshape(-1).to(group.device) for i in bucket])
        group.broadcast(flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_state(group: WeightSyncGroup, spec: Spec, bucket_mb: int = 256) -> Tuple[Dict[str, torch.Tensor], int]:
    """Ranks 1..N: the tensors (views into fresh flat buffers) and their version."""
    buckets = plan_buckets(spec, bucket_mb << 20)
    header = torch.zeros(3, dtype=torch.int64, device=group.device)
    group.broadcast(header)
    version, digest, count = (int(v) for v in header.tolist())
    if digest != spec_hash(spec) or count != len(buckets):
        raise RuntimeError(
            "weight sync: the trainer's state dict (names, shapes, dtypes) differs from this rollout "
            "worker's model; both must be built from the same model config"
        )
    out = {}
    for bucket in buckets:
        dtype = spec[bucket[0]][2]
        flat = torch.empty(sum(_numel(spec[i][1]) for i in bucket), dtype=dtype, device=group.device)
        group.broadcast(flat)
        offset = 0
        for i in bucket:
            name, shape, _ = spec[i]
            n = _numel(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
    return out, version
