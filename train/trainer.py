"""The training loop: micro-batches -> runner.forward_backward -> clip -> AdamW -> expert-bias update.

Everything else (console, JSONL, W&B, speed/MFU, SIGTERM, progress bar) is a callback. The loop owns the training
state that a resume must restore exactly: step, tokens seen, skip counters, model, optimizer, data position and the
RNG of every rank; all of it goes into one DCP checkpoint.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from latentforge.model.errors import UserError

from . import distributed as world
from .checkpoint import CheckpointManager, checkpoint_keys, pack, unpack
from .config import OptimConfig, TrainConfig
from .optim import OptimizerContainer, step_if_finite
from .schedule import LRSchedule
from .seq_schedule import SeqLenSchedule, StepShape


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of silently skipping forever."""


class ResumeMismatchError(UserError, RuntimeError):
    """The checkpoint was written for a different model or tokenizer than this run uses."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones included)
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    consecutive_nonfinite: int = 0
    callbacks: dict = field(default_factory=dict)  # name -> callback state (W&B run id)
    model_config: Optional[dict] = None
    tokenizer: Optional[dict] = None  # the tokenizer's fingerprint
    schedule: Optional[dict] = None


class ModelState:
    """The model parts of this rank as one DCP `Stateful` (fully-qualified names, any parallel layout)."""

    def __init__(self, model_parts: list):
        self.model_parts = list(model_parts)

    def state_dict(self) -> dict:
        merged = {}
        for part in self.model_parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state_dict: dict) -> None:
        for part in self.model_parts:
            own = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in own}, options=StateDictOptions(strict=True))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _float(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def compile_seconds() -> float:
    """Seconds torch.compile (dynamo + inductor, a cache hit included) has spent in this process so far."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without dynamo's timing table: report no compile time rather than fail
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def step_time_breakdown(
    started: float,
    data_time: float,
    fwd_bwd_done: float,
    clip_done: float,
    optimizer_done: float,
    comm: Optional[float],
    checkpoint: float,
    compile_time: float = 0.0,
) -> dict:
    """Seconds of each phase of one step. step_time covers data + fwd_bwd + clip + optimizer; comm_time is the
    part of fwd_bwd spent in the runner's blocking collectives (None on one process: there are none); the
    FSDP gathers and reduce-scatters overlap the backward and are inside fwd_bwd_time. checkpoint_time: saving
    after the previous step (a save runs between two steps). compile_time: the part of fwd_bwd spent compiling
    (parallel.compile: the first step, and any step whose shapes are new, e.g. under train.seq_len_schedule; a
    warm inductor cache makes it short), None when nothing compiled."""
    return {
        "data_time": data_time,
        "fwd_bwd_time": fwd_bwd_done - started - data_time,
        "comm_time": comm,
        "compile_time": compile_time or None,
        "clip_time": clip_done - fwd_bwd_done,
        "optimizer_time": optimizer_done - clip_done,
        "checkpoint_time": checkpoint,
        "step_time": optimizer_done - started,
    }


class Trainer:
    def __init__(
        self,
        *,
        runner,
        loader,
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        checkpoints: CheckpointManager,
        callbacks: Sequence = (),
        device: Optional[torch.device] = None,
        model_config: Optional[dict] = None,
        tokenizer=None,
        write_checkpoint_extra: Optional[Callable[[str], None]] = None,
    ):
        self.runner = runner
        self.loader = loader
        self.cfg = train_cfg
        self.optim_cfg = optim_cfg
        self.checkpoints = checkpoints
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.device = device or torch.device("cpu")
        self.tokenizer = tokenizer
        self.write_checkpoint_extra = write_checkpoint_extra

        self.grad_accumulation = train_cfg.grad_accumulation(runner.dp_size)
        # the (seq_len, micro-batch, global batch) of every step; one shape without train.seq_len_schedule
        self.seq_schedule = SeqLenSchedule.of(train_cfg, runner.dp_size, runner.layout.cp)
        if train_cfg.seq_len_schedule and not hasattr(loader, "stream"):
            raise TypeError(
                "train.seq_len_schedule needs a loader with one stream per length (data.mixed_length.MixedLengthLoader, "
                f"built by data.pretrain.build_mixed_length_pretrain_loader), got {type(loader).__name__}"
            )
        self.optimizer = OptimizerContainer(runner.model_parts, optim_cfg)
        self.schedule = LRSchedule(optim_cfg, train_cfg.steps)
        self.state = TrainState(
            model_config=model_config,
            tokenizer=tokenizer.fingerprint() if tokenizer is not None else None,
            schedule=self.schedule.state_dict(),
        )
        self.print_hook = None  # the progress bar routes console lines through itself
        self._stop_reason: Optional[str] = None
        self._batches = None
        self.last_checkpoint: Optional[str] = None
        self._failed_callbacks: set = set()
        self._checkpoint_seconds = 0.0  # spent saving since the last step's metrics (reported with the next step)

    # ----- small accessors the callbacks use -------------------------------------------------------------------
    @property
    def is_metrics_rank(self) -> bool:
        return self.runner.is_metrics_rank

    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    @property
    def last_step(self) -> int:
        return self.cfg.last_step

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.cfg.seq_len

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason

    def print(self, line: str, stream=None) -> None:
        if self.print_hook is not None:
            self.print_hook(line)
        else:
            print(line, file=stream or sys.stdout, flush=True)

    # ----- checkpoint state ------------------------------------------------------------------------------------
    def _named_callbacks(self) -> dict:
        return {type(c).__name__: c for c in self.callbacks}

    def checkpoint_state(self) -> dict:
        self.state.callbacks = {name: c.state_dict() for name, c in self._named_callbacks().items()}
        return {
            "model": ModelState(self.runner.model_parts),
            "optimizer": self.optimizer,
            "trainer": pack(asdict(self.state)),
            # position in the data differs per data-parallel rank; ranks that share a dp rank hold the same one
            f"dataloader_dp{self.runner.dp_rank}": pack(self.loader.state_dict()),
            f"rng_rank{world.rank()}": pack(rng_state()),
        }

    def save_checkpoint(self) -> str:
        started = time.perf_counter()
        try:
            return self._save_checkpoint()
        finally:
            self._checkpoint_seconds += time.perf_counter() - started

    def _save_checkpoint(self) -> str:
        path = self.checkpoints.save(self.state.step, self.checkpoint_state(), write_extra=self.write_checkpoint_extra)
        self.last_checkpoint = path
        self._run_callbacks("on_checkpoint", path)
        return path

    def _run_callbacks(self, hook: str, *args) -> None:
        """Every callback's `hook`; a non-essential one that raises (W&B lost its service, a full disk under
        metrics.jsonl) is reported once and switched off, so the loop and its checkpoints go on."""
        for c in self.callbacks:
            if id(c) in self._failed_callbacks:
                continue
            if c.essential:
                getattr(c, hook)(self, *args)
                continue
            try:
                getattr(c, hook)(self, *args)
            except Exception as error:  # noqa: BLE001 - a logger must never end the run
                self._failed_callbacks.add(id(c))
                print(
                    f"warning: callback {type(c).__name__} failed in {hook} at step {self.state.step} "
                    f"({type(error).__name__}: {error}); training continues without it",
                    file=sys.stderr,
                    flush=True,
                )

    def load_checkpoint(self, path: str) -> None:
        """Restore everything `checkpoint_state` saved. Refuses a checkpoint of another model or tokenizer."""
        stored = checkpoint_keys(path)
        for required in ("model", "optimizer", "trainer"):
            if required not in stored:
                raise ResumeMismatchError(
                    f"checkpoint {path} has no {required!r} entry; it was not written by "
                    "train/pretrain.py (or is damaged): start a new run directory"
                )
        # the small trainer record first: a checkpoint of another model is refused by name, not by a shape error
        head = {"trainer": b""}
        self.checkpoints.load(path, head)  # collective, like every load below: all ranks call it together
        saved = TrainState(**unpack(head["trainer"]))
        self._check_compatible(saved, path)

        state = self.checkpoint_state()
        del state["trainer"]
        loader_key = f"dataloader_dp{self.runner.dp_rank}"
        if loader_key not in stored:
            # saved with fewer data-parallel ranks: the loaders keep one global position (consumed samples, the same
            # on every rank, as data.loader.BatchLoader does), so data-parallel rank 0's is everyone's
            del state[loader_key]
            loader_key = "dataloader_dp0"
            state[loader_key] = b""
        missing = self.checkpoints.load(path, state)
        if saved.schedule is not None and saved.schedule != self.state.schedule and self.is_metrics_rank:
            self.print(
                f"note: the learning-rate schedule differs from the checkpoint's ({saved.schedule} -> "
                f"{self.state.schedule}); continuing with the new one from step {saved.step}"
            )
        saved.model_config = self.state.model_config
        saved.tokenizer = self.state.tokenizer
        saved.schedule = self.state.schedule
        self.state = saved
        for name, callback in self._named_callbacks().items():
            callback.load_state_dict(saved.callbacks.get(name, {}))

        if loader_key in missing:
            raise ResumeMismatchError(f"checkpoint {path} holds no data-loader position")
        self.loader.load_state_dict(unpack(state[loader_key]))
        rng_key = f"rng_rank{world.rank()}"
        if rng_key not in missing:  # a rank that did not exist under the saved layout keeps its fresh RNG
            set_rng_state(unpack(state[rng_key]))
        self._batches = None

    def _check_compatible(self, saved: TrainState, path: str) -> None:
        if (
            saved.model_config is not None
            and self.state.model_config is not None
            and saved.model_config != self.state.model_config
        ):
            diff = sorted(
                k
                for k in set(saved.model_config) | set(self.state.model_config)
                if saved.model_config.get(k) != self.state.model_config.get(k)
            )
            raise ResumeMismatchError(
                f"checkpoint {path} was written for another model: fields {diff} differ "
                f"(saved {[saved.model_config.get(k) for k in diff]}, now "
                f"{[self.state.model_config.get(k) for k in diff]}). Use the recipe it was trained with, "
                "or a new train.run_dir"
            )
        if saved.tokenizer is not None and self.tokenizer is not None:
            self.tokenizer.check_matches(saved.tokenizer, f"checkpoint {path}")

    def resume_if_possible(self) -> Optional[str]:
        """Load the newest intact checkpoint of the run (a damaged newer one is named and skipped, or stops the
        launch under train.strict_resume)."""
        if not self.cfg.resume:
            return None
        path = self.checkpoints.newest_intact(strict=self.cfg.strict_resume, warn=self._warn_loudly)
        if path is not None:
            self.load_checkpoint(path)
            self.last_checkpoint = path
        return path

    def _warn_loudly(self, line: str) -> None:
        if world.rank() == 0:
            print(line, file=sys.stderr, flush=True)

    def newest_intact_checkpoint(self) -> Optional[str]:
        """Collective. The checkpoint to go back to: the newest one whose checksums hold."""
        self.checkpoints.wait()
        from latentforge.model.manifest import CheckpointDamagedError

        try:
            return self.checkpoints.newest_intact(warn=self._warn_loudly)
        except CheckpointDamagedError as error:
            return f"none ({error})"

    # ----- the step --------------------------------------------------------------------------------------------
    def step_shape(self, step: int) -> StepShape:
        """The sequence length and batch sizes of step `step` (counted from 1)."""
        return self.seq_schedule.shape(step)

    def _micro_batch_source(self, seq_len: int):
        if self.cfg.seq_len_schedule:  # every length reads the one order (data.mixed_length)
            return self.loader.stream(seq_len)
        if self._batches is None:
            self._batches = iter(self.loader)
        return self._batches

    def _next_micro_batches(self, shape: StepShape) -> list:
        source = self._micro_batch_source(shape.seq_len)
        micro = []
        for _ in range(shape.grad_accumulation(self.runner.dp_size)):
            try:
                batch = next(source)
            except StopIteration:
                raise RuntimeError(
                    f"the data loader ran out at step {self.state.step}: give it more data or fewer train.steps"
                ) from None
            if self.cfg.seq_len_schedule and tuple(batch["input_ids"].shape) != (
                shape.micro_batch_size,
                shape.seq_len,
            ):
                raise RuntimeError(
                    f"step {self.state.step + 1} of train.seq_len_schedule wants micro-batches of "
                    f"{shape.micro_batch_size} x {shape.seq_len} tokens, the loader gave "
                    f"{tuple(batch['input_ids'].shape)}"
                )
            micro.append(
                {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            )
        return micro

    def train_step(self) -> dict:
        started = time.perf_counter()
        compiled_before = compile_seconds()
        step = self.state.step
        shape = self.step_shape(step + 1)
        micro_batches = self._next_micro_batches(shape)
        data_time = time.perf_counter() - started

        self.optimizer.zero_grad()
        if shape.context_parallel:
            result = self.runner.forward_backward(micro_batches)
        else:  # train.seq_len_schedule's cp: false (only such steps need a runner that takes the switch)
            result = self.runner.forward_backward(micro_batches, context_parallel=False)
        loss = _float(result["loss"])  # a host sync: the forward/backward has finished on the device
        fwd_bwd_done = time.perf_counter()
        grad_norm = _float(
            self.runner.clip_grad_norm_(self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf"))
        )
        clip_done = time.perf_counter()
        lr = self.schedule.lr_at(step)
        # the grad norm is global (every shard and stage), so every rank takes the same decision
        skipped = not step_if_finite(self.optimizer, loss, grad_norm, lr)
        expert_load = result.get("expert_load")
        if skipped:
            self.state.skipped_steps += 1
            self.state.consecutive_nonfinite += 1
        else:
            if expert_load is not None:
                self.runner.update_expert_bias(expert_load)
            self.state.consecutive_nonfinite = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the optimizer's kernels count in its own time, not the next step's
        optimizer_done = time.perf_counter()
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step

        metrics = {
            "step": self.state.step,
            "loss": loss,
            "lm_loss": _float(result["lm_loss"]) if result.get("lm_loss") is not None else loss,
            "mtp_losses": [_float(x) for x in result.get("mtp_losses") or []],
            "aux_loss": _float(result["aux_loss"]) if result.get("aux_loss") is not None else None,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": self.tokens_per_step,
            "seq_len": shape.seq_len,
            "micro_batch_size": shape.micro_batch_size,
            "target_tokens": int(_float(result["tokens"])) if result.get("tokens") is not None else None,
            "tokens_seen": self.state.tokens_seen,
            "skipped": skipped,
            "skipped_steps": self.state.skipped_steps,
            "moe_imbalance": moe_imbalance(expert_load),
            **step_time_breakdown(
                started,
                data_time,
                fwd_bwd_done,
                clip_done,
                optimizer_done,
                comm=self.runner.take_comm_seconds(),
                checkpoint=self._checkpoint_seconds,
                compile_time=compile_seconds() - compiled_before,
            ),
        }
        self._checkpoint_seconds = 0.0
        if self.state.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} non-finite losses in a row, the last at step {self.state.step} "
                f"(loss {loss}, grad norm {grad_norm}); stopping. Lower optim.lr or check the data; the newest "
                f"intact checkpoint is {self.newest_intact_checkpoint() or 'none'}"
            )
        return metrics

    # ----- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train from the current state to `last_step`; returns why it stopped: "finished" (all train.steps done),
        "train.stop_at_step=N", or the stop request's reason ("signal SIGTERM")."""
        self._run_callbacks("on_train_start")
        reason = "finished"
        start_step = self.state.step
        try:
            while self.state.step < self.last_step:
                metrics = self.train_step()
                self._run_callbacks("on_step_end", metrics)
                self.checkpoints.poll()
                if self._stop_reason is not None:
                    reason = self._stop_reason
                    break
                if self.state.step % self.cfg.checkpoint_interval == 0 and self.state.step < self.last_step:
                    self.save_checkpoint()
            if self._stop_reason is None and self.state.step < self.total_steps:
                reason = f"train.stop_at_step={self.last_step}"
            if self.state.step > start_step:  # the end of this launch (finished, stop_at_step or a signal): saved
                self.save_checkpoint()  # before any callback's end-of-run work (W&B's finish may fail or wait)
            elif self.last_checkpoint is None:
                self.last_checkpoint = self.checkpoints.latest()  # nothing left to train: the resumed one
            self.checkpoints.wait()
        except BaseException as error:
            reason = f"error: {type(error).__name__}"
            raise
        finally:
            for c in self.callbacks:
                if id(c) in self._failed_callbacks:
                    continue
                try:
                    c.on_train_end(self, reason)
                except Exception as cleanup_error:  # noqa: BLE001 - the checkpoint is saved; the loop's error matters more
                    print(
                        f"warning: callback {type(c).__name__} failed at train end ({type(cleanup_error).__name__}: "
                        f"{cleanup_error})",
                        file=sys.stderr,
                        flush=True,
                    )
        return reason


def moe_imbalance(expert_load) -> Optional[float]:
    """Max over MoE layers of (busiest expert's tokens / mean tokens per expert): 1.0 is perfect balance."""
    if expert_load is None:
        return None
    load = expert_load.detach().float().cpu() if torch.is_tensor(expert_load) else torch.tensor(expert_load).float()
    if load.numel() == 0:
        return None
    mean = load.mean(dim=-1).clamp_min(1e-9)
    return float((load.max(dim=-1).values / mean).max())
