"""The device mesh of a run and the process groups the parallel layer uses.

Mesh dimensions (outermost first): pp, dp_replicate, dp_shard_mod_ep, dp_shard_in_ep, cp, tp, where
dp_shard = dp_shard_mod_ep x dp_shard_in_ep and ep = dp_shard_in_ep x cp (the EP group borrows data-parallel and
context-parallel ranks, as TorchTitan does). Flattened views:
    dp           dp_replicate x dp_shard        which samples a rank reads; the counts of the global batch
    dp_shard_cp  dp_shard x cp                  FSDP2 sharding of the dense parameters
    ep           dp_shard_in_ep x cp            expert parallel (all-to-all)
    efsdp        dp_shard_mod_ep                FSDP2 sharding of each EP rank's experts
    seq          cp x tp                        ranks holding pieces of the same sequences
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .config import Layout

DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")


@dataclass
class Groups:
    """Sizes, ranks and process groups of one rank (groups are None when their size is 1)."""

    layout: Layout
    mesh: Optional[DeviceMesh] = None  # None for a single process
    flat: dict[str, DeviceMesh] = field(default_factory=dict)  # flattened meshes by name: dp, dp_shard_cp, ep, seq
    rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    tp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    cp_group: Optional[dist.ProcessGroup] = None
    tp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    seq_group: Optional[dist.ProcessGroup] = None
    # dp x cp: the ranks reading distinct sequences in a step without CP (train.seq_len_schedule's cp: false)
    dp_cp_group: Optional[dist.ProcessGroup] = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_metrics_rank(self) -> bool:
        if self.mesh is None:
            return True
        coords = _coordinate(self.mesh)
        return coords[0] == self.layout.pp - 1 and all(c == 0 for c in coords[1:])

    def fsdp_mesh(self) -> Optional[DeviceMesh]:
        """The mesh FSDP2 shards dense parameters over (2-D for HSDP), or None when no data parallelism.

        Tensor parallelism alone still gets a (size-1) FSDP mesh: every parameter then is a DTensor, which keeps
        optimizers with foreach=True working (they refuse a mix of DTensors and plain tensors)."""
        lay = self.layout
        if self.mesh is None or lay.dp_replicate * lay.dp_shard * lay.cp * lay.tp == 1:
            return None
        if lay.dp_replicate > 1:
            return _slice(self.mesh, ("dp_replicate", "dp_shard_cp"))
        return self.flat["dp_shard_cp"]

    def expert_fsdp_mesh(self) -> Optional[DeviceMesh]:
        lay = self.layout
        if self.mesh is None or lay.dp_replicate * lay.dp_shard * lay.cp == 1:
            return None
        if lay.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_mod_ep"]
        return self.mesh["dp_shard_mod_ep"]

    def sub(self, name: str) -> DeviceMesh:
        """A 1-D mesh by name: a mesh dimension or a flattened view."""
        if name in self.flat:
            return self.flat[name]
        if self.mesh is None:
            raise RuntimeError(f"a single process has no device mesh, so no {name!r} mesh")
        return self.mesh[name]


def _coordinate(mesh: DeviceMesh) -> Sequence[int]:
    coords = mesh.get_coordinate()
    assert coords is not None, "the mesh spans the whole world, so it holds this rank"
    return coords


def _slice(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slicing a flattened dim together with a root dim (HSDP)
        return mesh[names]


def _group(mesh: DeviceMesh, size: int) -> Optional[dist.ProcessGroup]:
    return mesh.get_group() if size > 1 else None


def build_groups(layout: Layout, device_type: str) -> Groups:
    """The mesh for `layout` over the launched world (no mesh and no groups for a single process)."""
    if layout.world_size == 1:
        return Groups(layout=layout)
    if not dist.is_initialized():
        raise RuntimeError(
            "build_runner: world size > 1 but torch.distributed is not initialised; launch with "
            "torchrun (the trainer calls init_process_group)"
        )
    from torch.distributed.device_mesh import init_device_mesh

    lay = layout
    shape = (lay.pp, lay.dp_replicate, lay.dp_shard_mod_ep, lay.dp_shard_in_ep, lay.cp, lay.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    flat = {
        "dp": mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp"),
        "dp_shard_cp": mesh["dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_shard_cp"),
        "ep": mesh["dp_shard_in_ep", "cp"]._flatten("ep"),
        "seq": mesh["cp", "tp"]._flatten("seq"),
    }
    if lay.cp > 1:  # only runs with CP can have steps without it: no extra communicator for the others
        flat["dp_cp"] = mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_cp")
    coords = _coordinate(mesh)
    return Groups(
        layout=lay,
        mesh=mesh,
        flat=flat,
        rank=dist.get_rank(),
        pp_rank=coords[0],
        dp_rank=flat["dp"].get_local_rank(),
        cp_rank=coords[4],
        tp_rank=coords[5],
        pp_group=_group(mesh["pp"], lay.pp),
        dp_group=_group(flat["dp"], lay.dp),
        cp_group=_group(mesh["cp"], lay.cp),
        tp_group=_group(mesh["tp"], lay.tp),
        ep_group=_group(flat["ep"], lay.ep),
        seq_group=_group(flat["seq"], lay.cp * lay.tp),
        dp_cp_group=_group(flat["dp_cp"], lay.dp * lay.cp) if lay.cp > 1 else _group(flat["dp"], lay.dp),
    )


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is usable (and the group, if any, is not gloo), else cpu."""
    import os

    if torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() != "gloo"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
