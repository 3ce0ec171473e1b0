"""One trainer rank of GRPO: the policy on the pretraining parallel layout, the optimizer, the GRPO step, the full
weights for the rollout workers, and the checkpoint (DCP, the trainer's own format).

Plain Python (no Ray): `rl.actors.TrainerActor` hosts one per rank; tests use it directly. The rank joins the
torch.distributed world described by its environment (MASTER_ADDR, RANK, WORLD_SIZE...), as under torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from model import HybridModel, ModelConfig
from rl.batch import collate, count, group_rows, shard_micro_batches
from rl.buffer import Group
from rl.config import GRPOConfig
from rl.policy import PolicyForward, add_stats, grpo_micro_batch_loss, mtp_labels_of, token_logprobs
from train import distributed as world
from train.checkpoint import CheckpointManager, pack, unpack
from train.config import OptimConfig
from train.optim import OptimizerContainer
from train.schedule import LRSchedule
from train.trainer import ModelState, rng_state, set_rng_state

MODEL_CONFIG_FILE = "model_config.json"  # what train.export reads next to the shards


def resolve_model_config(init_from: Optional[str], recipe_model: dict) -> dict:
    """The policy's architecture: the checkpoint's own when starting from one, else the recipe's `model` group."""
    if init_from is None:
        return dict(recipe_model)
    if os.path.isfile(os.path.join(init_from, "config.json")):
        from model.hf import from_hf_config

        with open(os.path.join(init_from, "config.json")) as f:
            return from_hf_config(json.load(f)).to_dict()
    from train.export import resolve_checkpoint

    path = os.path.join(resolve_checkpoint(init_from), MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rl.init_from={init_from}: {path} is missing; give a Hugging Face directory "
                                "(config.json + safetensors) or a DCP checkpoint written by train/")
    with open(path) as f:
        return json.load(f)


def load_initial_model(init_from: Optional[str], model_cfg: ModelConfig, seed: int = 0) -> HybridModel:
    """The starting policy (CPU, fp32): a Hugging Face directory, a DCP checkpoint / run directory, or (None) a
    fresh initialisation from `seed` (tests, smoke runs)."""
    if init_from is None:
        torch.manual_seed(seed)
        return HybridModel(model_cfg)
    if not os.path.exists(init_from):
        raise FileNotFoundError(f"rl.init_from={init_from} does not exist: point it at the SFT run's HF export "
                                "(<run_dir>/hf) or its checkpoint directory")
    if os.path.isfile(os.path.join(init_from, "config.json")):
        from model.hf import load_pretrained

        return load_pretrained(init_from)
    from train.export import load_model_from_checkpoint

    return load_model_from_checkpoint(init_from)


def state_digest(state: dict) -> float:
    """A cheap order-sensitive fingerprint of a state dict (tests compare weights across processes with it)."""
    return float(sum(v.double().sum().item() * (i + 1) for i, (_, v) in enumerate(sorted(state.items()))))


def model_config_dict(cfg: ModelConfig) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


class PolicyTrainer:
    """Layouts: one process, or N data-parallel ranks (DistributedDataParallel: each rank a full replica,
    gradients all-reduced). Model-sharding layouts (TP / PP / CP / EP / FSDP) need a GRPO loss hook in
    train.parallel's runner, which does not exist yet: asking for one is a clear error."""

    def __init__(self, model_cfg: dict, cfg: GRPOConfig, optim_cfg: OptimConfig, run_dir: str,
                 parallel_cfg: Optional[dict] = None):
        world.init_distributed()
        self.cfg = cfg
        self.device = world.training_device()
        self.model_cfg = ModelConfig.from_dict(dict(model_cfg))
        sharded = {k: v for k, v in (parallel_cfg or {}).items()
                   if k in ("tp", "pp", "cp", "ep", "dp_replicate") and v not in (None, 1)}
        if sharded and world.world_size() > 1:
            raise NotImplementedError(
                f"the GRPO trainer group runs data-parallel replicas only; parallel settings {sharded} need a loss "
                "hook in train.parallel's runner (see docs). Set them to 1 for rl/grpo.py")
        model = load_initial_model(cfg.init_from, self.model_cfg, seed=cfg.seed).to(self.device)
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = model
        self.forward = PolicyForward(model, with_mtp=cfg.mtp_loss_weight > 0)
        self.dp_rank, self.dp_size = world.rank(), world.world_size()
        if self.dp_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # unrouted experts and, without MTP training, the MTP block get no gradient in some micro-batches
            self.forward = DistributedDataParallel(self.forward, find_unused_parameters=True)
        self.parts = [model]
        self.optim_cfg = optim_cfg
        self.optimizer = OptimizerContainer(self.parts, optim_cfg)
        self.schedule = LRSchedule(optim_cfg, cfg.steps)
        self.checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep_last=cfg.keep_last)
        self.version = 0

    # ----- the GRPO step ---------------------------------------------------------------------------------------
    def train_step(self, groups: List[Group]) -> dict:
        """One optimizer update on these groups; the weights go from version v to v + 1. Every rank gets the same
        groups and trains on its data-parallel share. Returns metrics (identical on every rank)."""
        start = time.perf_counter()
        cfg = self.cfg
        rows = group_rows(groups, cfg.loss.normalize_std, cfg.filter_overlong)
        counts = count(rows, cfg.rollout.max_new_tokens)
        micro = shard_micro_batches(rows, self.dp_rank, self.dp_size, cfg.trainer.micro_batch_size)
        self.model.train()
        stats, loads = {}, []
        for i, rows_mb in enumerate(micro):
            mb = collate(rows_mb, self.device)
            sync = self.dp_size == 1 or i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                logits, mtp_sums, aux = self.forward(mb["input_ids"], mtp_labels_of(mb))
                loss, mb_stats = grpo_micro_batch_loss(
                    logits, mtp_sums, aux, mb, counts, cfg.loss, temperature=cfg.rollout.temperature,
                    train_version=self.version, mtp_loss_weight=cfg.mtp_loss_weight,
                    moe_aux_loss_coeff=self.model_cfg.moe_aux_loss_coeff, total_sequences=len(rows),
                    ref_logprobs=self._ref_logprobs(mb))
                # the loss is this micro-batch's share of a global sum; DDP averages gradients over ranks
                (loss * self.dp_size).backward()
            add_stats(stats, mb_stats)
            loads.append(self._expert_load())
        stats = self._reduce_stats(stats)
        grad_norm = self._clip()
        lr = self.schedule.lr_at(self.version)
        self.optimizer.set_lr(lr)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if cfg.update_expert_bias and loads and loads[0] is not None:
            load = torch.stack(loads).sum(0)
            if world.is_distributed():
                dist.all_reduce(load)
            self.model.update_expert_bias(load)
        self.version += 1
        elapsed = time.perf_counter() - start
        tokens = sum(len(r["input_ids"]) for r in rows)
        return {"grad_norm": grad_norm, "lr": lr, "train_s": elapsed, "train_tokens": tokens,
                "train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "sequences": len(rows),
                "loss_tokens": counts.num_tokens, **stats}

    def _ref_logprobs(self, mb) -> Optional[torch.Tensor]:
        if self.ref_model is None:
            return None
        with torch.no_grad():
            return token_logprobs(self.ref_model(mb["input_ids"]).logits, mb["targets"], self.cfg.rollout.temperature)

    def _expert_load(self):
        layers = self.model.moe_layers()
        if not layers or any(m.load is None for m in layers):
            return None
        return torch.stack([m.load.float() for m in layers])

    def _clip(self) -> float:
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        params = [p for part in self.parts for p in part.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _reduce_stats(self, stats: dict) -> dict:
        if not world.is_distributed():
            return stats
        keys = sorted(stats)
        sums = torch.tensor([0.0 if k.endswith("_max") else stats[k] for k in keys], dtype=torch.float64)
        maxes = torch.tensor([stats[k] if k.endswith("_max") else 0.0 for k in keys], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        return {k: (maxes[i] if k.endswith("_max") else sums[i]).item() for i, k in enumerate(keys)}

    # ----- weights for the rollout workers ---------------------------------------------------------------------
    def full_state_dict(self) -> Optional[dict]:
        """Every tensor of the policy (parameters and persistent buffers): on rank 0, None elsewhere (the
        data-parallel replicas are identical)."""
        if world.rank() != 0:
            return None
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # ----- checkpoint ------------------------------------------------------------------------------------------
    def _state(self, loop_state: bytes = b"") -> dict:
        return {"model": ModelState(self.parts), "optimizer": self.optimizer,
                "grpo_trainer": pack({"version": self.version}), "grpo_loop": loop_state,
                f"rng_rank{world.rank()}": pack(rng_state())}

    def save_checkpoint(self, loop_state: bytes) -> str:
        """Collective over the trainer group; `loop_state` is the driver's (prompt position, buffer, counters)."""
        def extra(tmp_dir):
            with open(os.path.join(tmp_dir, MODEL_CONFIG_FILE), "w") as f:
                json.dump(model_config_dict(self.model_cfg), f, indent=1)

        return self.checkpoints.save(self.version, self._state(pack(loop_state)), write_extra=extra)

    def latest_checkpoint(self) -> Optional[str]:
        return self.checkpoints.latest()

    def load_checkpoint(self, path: str) -> bytes:
        """Restore model, optimizer, version and RNG; return the driver's loop state."""
        state = self._state(pack(b""))
        missing = self.checkpoints.load(path, state)
        for key in ("model", "optimizer", "grpo_trainer", "grpo_loop"):
            if key in missing:
                raise RuntimeError(f"checkpoint {path} has no {key!r}: it was not written by rl/grpo.py")
        self.version = unpack(state["grpo_trainer"])["version"]
        rng_key = f"rng_rank{world.rank()}"
        if rng_key not in missing:
            set_rng_state(unpack(state[rng_key]))
        return unpack(state["grpo_loop"])

    def close(self):
        self.checkpoints.close()
