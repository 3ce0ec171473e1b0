"""One trainer rank of GRPO: the policy on the pretraining parallel layout (train.parallel's runner, with the GRPO
loss as its loss hook), the optimizer, the GRPO step, the full weights for the rollout workers, and the checkpoint
(DCP, the trainer's own format).

Plain Python (no Ray): `rl.actors.TrainerActor` hosts one per rank; tests use it directly. The rank joins the
torch.distributed world described by its environment (MASTER_ADDR, RANK, WORLD_SIZE...), as under torchrun.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from latentforge.model import HybridModel, ModelConfig
from latentforge.model.hf import MODEL_CONFIG_FILE
from latentforge.rl.batch import collate, count, group_rows, padded_length, shard_micro_batches
from latentforge.rl.buffer import Group
from latentforge.rl.config import GRPOConfig
from latentforge.rl.policy import PROX_KEY, GRPOLoss, ProximalLogprobs, token_logprobs
from latentforge.train import distributed as world
from latentforge.train.checkpoint import CheckpointManager, pack, unpack
from latentforge.train.config import OptimConfig
from latentforge.train.optim import OptimizerContainer, step_if_finite
from latentforge.train.parallel import build_runner
from latentforge.train.parallel.config import ParallelConfig
from latentforge.train.precision.config import PrecisionConfig
from latentforge.train.schedule import LRSchedule
from latentforge.train.trainer import ModelState, NonFiniteLossError, rng_state, set_rng_state


def resolve_model_config(init_from: Optional[str], recipe_model: ModelConfig) -> ModelConfig:
    """The policy's architecture: the checkpoint's own when starting from one, else the recipe's `model` group."""
    if init_from is None:
        return recipe_model
    from latentforge.train.lora.checkpoint import model_config_of

    try:
        return model_config_of(init_from)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"rl.init_from={init_from}: {e}") from None


def load_initial_model(init_from: Optional[str], model_cfg: ModelConfig, seed: int = 0) -> HybridModel:
    """The starting policy (CPU, fp32): a Hugging Face directory, a DCP checkpoint / run directory, or (None) a
    fresh initialisation from `seed` (tests, smoke runs)."""
    if init_from is None:
        torch.manual_seed(seed)
        return HybridModel(model_cfg)
    if not os.path.exists(init_from):
        raise FileNotFoundError(
            f"rl.init_from={init_from} does not exist: point it at the SFT run's HF export "
            "(<run_dir>/hf) or its checkpoint directory"
        )
    if os.path.isfile(os.path.join(init_from, "config.json")):
        from latentforge.model.hf import load_pretrained

        return load_pretrained(init_from)
    from latentforge.train.export import load_model_from_checkpoint

    return load_model_from_checkpoint(init_from)


def split_mini_batches(rows: List[dict], n: int) -> List[List[dict]]:
    """`rows` in n consecutive mini-batches of near-equal size (the first ones one row longer)."""
    if n > len(rows):
        raise ValueError(
            f"rl.updates_per_batch={n} exceeds the batch's {len(rows)} trainable sequences: lower "
            "rl.updates_per_batch or raise rl.groups_per_step"
        )
    size, extra = divmod(len(rows), n)
    bounds = [k * size + min(k, extra) for k in range(n + 1)]
    return [rows[bounds[k] : bounds[k + 1]] for k in range(n)]


def merge_step_metrics(steps: List[dict]) -> dict:
    """One batch's metrics from its optimizer steps: sums, maxima for `_max` and grad_norm, the mean loss, the
    last lr."""
    merged = {}
    for key in steps[0]:
        values = [s[key] for s in steps if s.get(key) is not None]
        if not values:
            merged[key] = None
        elif key.endswith("_max") or key == "grad_norm":
            merged[key] = max(values)
        elif key == "lr":
            merged[key] = values[-1]
        elif key == "loss":
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = sum(values)
    merged["optimizer_steps"] = len(steps)
    return merged


def state_digest(state: dict) -> float:
    """A cheap order-sensitive fingerprint of a state dict (tests compare weights across processes with it)."""
    return float(sum(v.double().sum().item() * (i + 1) for i, (_, v) in enumerate(sorted(state.items()))))


class PolicyTrainer:
    """One rank of the GRPO trainer group on any pretraining parallel layout: `train.parallel.build_runner` owns
    the layout (a single process, FSDP2/HSDP data parallelism, TP, PP, CP, EP and their combinations, from the
    recipe's `parallel` group) and the GRPO loss is its loss hook (rl.policy.GRPOLoss)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: GRPOConfig,
        optim_cfg: OptimConfig,
        run_dir: str,
        parallel_cfg: Optional[ParallelConfig] = None,
        precision_cfg: Optional[PrecisionConfig] = None,
    ):
        world.init_distributed()
        self.cfg = cfg
        self.model_cfg = model_cfg
        model = load_initial_model(cfg.init_from, self.model_cfg, seed=cfg.seed)
        if cfg.mtp_loss_weight == 0 and model.mtp is not None:
            model.mtp.requires_grad_(False)  # rl.mtp_loss_weight=0: the MTP block stays as it is
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            # the reference is a full, unsharded replica on every rank: it scores each rank's micro-batches (whole
            # sequences) before the runner slices them, so it works under every layout, at the memory of one
            # extra model per rank
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # precision_cfg: the recipe's `precision` group; its param_dtype (auto: bf16 on GPU) sets the trainer's
        # compute dtype (the rollout engine's own dtype is set apart, and truncated importance weights correct the gap)
        # batches carry the rollout's routes when recorded: the runner counts router agreement, and replays them
        # (each trunk MoE layer uses the rollout's experts) under rl.router_replay
        self.runner = build_runner(model, self.model_cfg, parallel_cfg, precision_cfg)  # shards `model` in place
        self.device = self.runner.device
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        # the policy module: the plain model in a world of one; under other layouts its pieces are sharded or
        # split between ranks (use the runner, and full_state_dict() for the weights)
        self.model = model
        self.parts = self.runner.model_parts
        self.dp_rank, self.dp_size = self.runner.dp_rank, self.runner.dp_size
        self.optim_cfg = optim_cfg
        self.optimizer = OptimizerContainer(self.parts, optim_cfg)
        self.schedule = LRSchedule(optim_cfg, cfg.steps)
        self.checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep_last=cfg.keep_last)
        self.version: int = 0
        self.consecutive_nonfinite = 0

    # ----- the GRPO step ---------------------------------------------------------------------------------------
    def train_step(self, groups: List[Group]) -> dict:
        """`rl.updates_per_batch` optimizer updates on these groups (one per mini-batch of rows); the weights go
        from version v to v + updates_per_batch. Every rank gets the same groups and trains on its data-parallel
        share. Returns metrics (identical on every rank): sums over the mini-batches, maxima for `_max` keys."""
        start = time.perf_counter()
        cfg = self.cfg
        rows = group_rows(groups, cfg.loss.normalize_std, cfg.filter_overlong)
        for part in self.parts:
            part.train()
        mini_batches = split_mini_batches(rows, cfg.updates_per_batch)
        micro = [self._micro_batches(chunk) for chunk in mini_batches]
        prox = None
        if len(mini_batches) > 1:
            prox = self._proximal_logprobs(micro)
        steps = [self._optimizer_step(chunk, mbs, prox) for chunk, mbs in zip(mini_batches, micro)]
        elapsed = time.perf_counter() - start
        tokens = sum(len(r["input_ids"]) for r in rows)
        return {
            **merge_step_metrics(steps),
            "train_s": elapsed,
            "train_tokens": tokens,
            "train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "sequences": len(rows),
        }

    def _proximal_logprobs(self, micro: List[List[dict]]) -> dict:
        """pi_prox of every micro-batch of the rollout batch, with the weights as they are now (forward only)."""
        recorder = ProximalLogprobs(self.cfg.rollout.sampling.temperature)
        for k, mbs in enumerate(micro):
            for i, mb in enumerate(mbs):
                mb[PROX_KEY] = (k, i)
            self.runner.evaluate(mbs, recorder, replay_routes=self.cfg.router_replay)
        return recorder.by_key

    def _optimizer_step(self, rows: List[dict], micro: List[dict], prox: Optional[dict]) -> dict:
        """One optimizer update (version v -> v + 1) on one mini-batch; a non-finite loss or gradient norm skips
        it, weights and AdamW state untouched (train.optim.step_if_finite)."""
        cfg = self.cfg
        counts = count(rows, cfg.rollout.sampling.max_new_tokens)
        loss_fn = GRPOLoss(
            counts,
            cfg.loss,
            temperature=cfg.rollout.sampling.temperature,
            train_version=self.version,
            mtp_loss_weight=cfg.mtp_loss_weight,
            prox_logprobs=prox,
        )
        self.optimizer.zero_grad()
        result = self.runner.forward_backward(micro, loss_fn, replay_routes=cfg.router_replay)
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = float(self.runner.clip_grad_norm_(max_norm))
        lr = self.schedule.lr_at(self.version)
        stepped = step_if_finite(self.optimizer, float(result["loss"]), grad_norm, lr)
        self.optimizer.zero_grad()
        self._count_nonfinite(stepped, result["loss"], grad_norm)
        if stepped and cfg.update_expert_bias and result["expert_load"] is not None:
            self.runner.update_expert_bias(result["expert_load"])
        self.version += 1
        stats = dict(result["stats"])
        if result["aux_loss"] is not None:
            stats["aux_loss_sum"] = result["aux_loss"]  # unweighted balance loss of the mini-batch
        return {
            "loss": result["loss"],
            "grad_norm": grad_norm,
            "lr": lr,
            "loss_tokens": counts.num_tokens,
            "skipped_steps": 0 if stepped else 1,
            **stats,
        }

    def _count_nonfinite(self, stepped: bool, loss: float, grad_norm: float) -> None:
        if stepped:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        print(
            f"[grpo trainer] version {self.version}: non-finite loss {loss} or grad norm {grad_norm}; step "
            f"skipped ({self.consecutive_nonfinite} in a row)",
            flush=True,
        )
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} non-finite GRPO steps in a row (rl.max_consecutive_nonfinite), the "
                f"last at version {self.version}: stopping. Check the rewards / advantages for NaN, lower optim.lr, "
                f"and resume from the last good checkpoint: {self.checkpoints.latest() or 'none written yet'}"
            )

    def _micro_batches(self, rows: List[dict]) -> List[dict]:
        """This rank's micro-batches as tensors, shaped for the layout: lengths divisible by the sequence split
        (cp x tp; cp x chunk_size for Mamba under CP), and under pipeline parallelism enough micro-batches for
        the schedule, all of one shape (padded rows and positions have loss mask 0)."""
        lay, pc = self.runner.layout, self.runner.parallel_cfg
        multiple = lay.cp * lay.tp
        if lay.cp > 1 and "mamba" in self.model_cfg.layer_types:
            multiple = math.lcm(multiple, lay.cp * self.model_cfg.chunk_size)
        pipelined = lay.pp > 1
        micro_rows = shard_micro_batches(
            rows,
            self.dp_rank,
            self.dp_size,
            self.cfg.trainer.micro_batch_size,
            min_micro_batches=lay.pp,
            multiple_of=lay.pp if pc.pp_schedule == "interleaved_1f1b" else 1,
        )
        if pipelined:
            length, num_rows = padded_length(rows, multiple), max(len(m) for m in micro_rows)
        batches = []
        for chunk in micro_rows:
            if pipelined:
                mb = collate(chunk, self.device, length=length, num_rows=num_rows)
            else:
                mb = collate(chunk, self.device, length=padded_length(chunk, multiple))
            if self.ref_model is not None:
                with torch.no_grad():
                    logits = self.ref_model(mb["input_ids"]).logits
                mb["ref_logprobs"] = token_logprobs(logits, mb["targets"], self.cfg.rollout.sampling.temperature)
            batches.append(mb)
        return batches

    # ----- weights for the rollout workers ---------------------------------------------------------------------
    def full_state_dict(self) -> Optional[dict]:
        """Every tensor of the policy (parameters and persistent buffers) under the unsharded model's names, on
        global rank 0; None elsewhere. Collective over the trainer group: sharded tensors (DTensors of FSDP, TP,
        EP, all stored in natural order with global shapes) are gathered in place, and under pipeline
        parallelism each stage's tensors travel to rank 0 (from the stage's first rank, through CPU). Unsharded
        tensors are the live ones, not copies (a world of one returns the parameters themselves)."""
        from torch.distributed.tensor import DTensor

        groups = self.runner.groups
        pipelined = self.runner.layout.pp > 1
        coords = groups.mesh.get_coordinate() if groups.mesh is not None else [0]
        representative = all(c == 0 for c in coords[1:])  # the first rank of its pipeline stage
        keep = world.rank() == 0 or (pipelined and representative)
        state = {}
        for part in self.parts:
            for name, value in part.state_dict().items():
                full = value.full_tensor() if isinstance(value, DTensor) else value.detach()  # collective
                if keep:
                    state[name] = full
        if pipelined and representative:
            if world.rank() == 0:
                gathered: List[Optional[dict]] = [None] * self.runner.layout.pp
                dist.gather_object(None, gathered, dst=0, group=groups.pp_group)
                for stage_state in gathered:
                    state.update(stage_state or {})
            else:
                dist.gather_object({k: v.cpu() for k, v in state.items()}, None, dst=0, group=groups.pp_group)
        return state if world.rank() == 0 else None

    # ----- checkpoint ------------------------------------------------------------------------------------------
    def _state(self, loop_state: bytes = b"") -> dict:
        return {
            "model": ModelState(self.parts),
            "optimizer": self.optimizer,
            "grpo_trainer": pack({"version": self.version}),
            "grpo_loop": loop_state,
            f"rng_rank{world.rank()}": pack(rng_state()),
        }

    def save_checkpoint(self, loop_state: bytes) -> str:
        """Collective over the trainer group; `loop_state` is the driver's (prompt position, buffer, counters)."""

        def extra(tmp_dir):
            with open(os.path.join(tmp_dir, MODEL_CONFIG_FILE), "w") as f:
                json.dump(self.model_cfg.to_dict(), f, indent=1)

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
