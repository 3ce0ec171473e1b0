"""A trainer rank as a Ray actor: joins the trainer group's torch.distributed world, hosts a PolicyTrainer, and
(rank 0) sends weights to the rollout workers."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, List, Optional

import torch

from latentforge.model.config import ModelConfig
from latentforge.rl.buffer import Group
from latentforge.rl.config import GRPOConfig
from latentforge.train.config import OptimConfig
from latentforge.train.parallel.config import ParallelConfig
from latentforge.train.precision.config import PrecisionConfig
from latentforge.rl.weight_sync import WeightSyncGroup, free_port, node_ip, send_state

if TYPE_CHECKING:
    from latentforge.rl.trainer import PolicyTrainer


class TrainerRank:
    def __init__(self, rank: int, world_size: int, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.trainer: Optional[PolicyTrainer] = None  # built by setup()
        self._sync: Optional[WeightSyncGroup] = None

    def _policy(self) -> PolicyTrainer:
        if self.trainer is None:
            raise RuntimeError("TrainerRank.setup() must run first: it builds the policy trainer")
        return self.trainer

    def address(self) -> tuple:
        """(ip, a free port) on this rank's node: rank 0 hosts the rendezvous of the trainer world."""
        return node_ip(), free_port()

    def setup(
        self,
        master: tuple,
        model_cfg: ModelConfig,
        cfg: GRPOConfig,
        optim_cfg: OptimConfig,
        run_dir: str,
        parallel_cfg: Optional[ParallelConfig] = None,
        precision_cfg: Optional[PrecisionConfig] = None,
    ) -> dict:
        os.environ.update(
            MASTER_ADDR=str(master[0]),
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: it is device 0
            torch.cuda.set_device(0)
        from latentforge.rl.trainer import PolicyTrainer

        self.trainer = PolicyTrainer(model_cfg, cfg, optim_cfg, run_dir, parallel_cfg, precision_cfg)
        return {"rank": self.rank, "dp_rank": self.trainer.dp_rank, "dp_size": self.trainer.dp_size}

    def train_step(self, groups: List[Group]) -> dict:
        return self._policy().train_step(groups)

    # ----- weights out ---------------------------------------------------------------------------------------
    def join_sync_group(self, host: str, port: int, world_size: int, backend: str) -> int:
        """Rank 0 only: group rank 0 of the weight-sync group (it hosts the rendezvous); again, in a new group,
        after a rollout worker died."""
        if self._sync is not None:
            self._sync.close()
        self._sync = WeightSyncGroup(host, port, 0, world_size, backend)
        return 0

    def push_broadcast(self, bucket_mb: int) -> dict:
        """Every trainer rank calls it (gathering sharded layouts is collective); rank 0 broadcasts."""
        trainer = self._policy()
        start = time.perf_counter()
        state = trainer.full_state_dict()
        gathered = time.perf_counter()
        sent = 0
        if self.rank == 0:
            if self._sync is None:
                raise RuntimeError("push_broadcast: rank 0 must join_sync_group() before it broadcasts")
            assert state is not None, "rank 0 gathers the full state dict"
            sent = send_state(self._sync, state, trainer.version, bucket_mb)
        done = time.perf_counter()
        return {"version": trainer.version, "gather_s": gathered - start, "sync_s": done - start, "bytes": sent}

    def export_weights(self):
        """Object-store path: rank 0 returns the full CPU tensors (the driver passes the reference on); every
        trainer rank calls it (gathering sharded layouts is collective)."""
        state = self._policy().full_state_dict()
        if state is None:
            return None
        return {k: v.detach().cpu() for k, v in state.items()}

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, loop_state: bytes) -> str:
        return self._policy().save_checkpoint(loop_state)

    def latest_checkpoint(self) -> Optional[str]:
        return self._policy().latest_checkpoint()

    def load_checkpoint(self, path: str) -> bytes:
        return self._policy().load_checkpoint(path)

    def version(self) -> int:
        return self._policy().version

    def weights_digest(self) -> float:
        """A cheap fingerprint of the weights (tests compare runs with it). Every trainer rank calls it (gathering
        sharded layouts is collective); rank 0 returns it, the others 0.0."""
        from latentforge.rl.trainer import state_digest

        state = self._policy().full_state_dict()
        return 0.0 if state is None else state_digest(state)

    def close(self):
        if self.trainer is not None:
            self.trainer.close()
        if self._sync is not None:
            self._sync.close()
