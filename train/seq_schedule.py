"""Per-step sequence lengths for runs that mix lengths (train.seq_len_schedule), at a constant token budget per step.

A schedule is a list of phases repeated in order until the run ends. A phase is `{seq_len: L, steps: n}` or a bare
length `L` (one step): `[1048576, 4096]` alternates the two lengths every step, `[{seq_len: 4096, steps: 100},
{seq_len: 65536, steps: 50}]` runs 100 short steps, then 50 long ones, then again. Step s (counted from 1, as the
trainer counts them) belongs to phase p where the steps before s, modulo one cycle, fall.

The token budget of one step is `train.global_batch_size x train.seq_len` and every phase keeps it: a phase of
length L takes budget / L sequences per step. A micro-batch keeps the tokens of `train.micro_batch_size x
train.seq_len` (the memory one forward/backward was sized for), floored at one sequence; past that, longer
sequences are what context parallelism is for. The learning-rate schedule, `tokens_seen` and the optimizer see the
same number of tokens on every step, whichever length it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from .config import TrainConfigError

KEY = "train.seq_len_schedule"


class SeqLenScheduleError(TrainConfigError):
    """A schedule that cannot keep the token budget or run on the layout; the message names the phase and the fix."""


@dataclass(frozen=True)
class StepShape:
    seq_len: int
    micro_batch_size: int  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int  # sequences per optimizer step over all data-parallel ranks

    def grad_accumulation(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)


@dataclass(frozen=True)
class SeqLenPhase:
    seq_len: int
    steps: int


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_phases(raw: Sequence) -> List[SeqLenPhase]:
    """The phases of a schedule as written in a recipe (each a bare length or {seq_len, steps})."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise SeqLenScheduleError(
            f"{KEY} must be a non-empty list of lengths or {{seq_len, steps}} phases (or [] for one length), "
            f"got {raw!r}"
        )
    phases = []
    for index, item in enumerate(raw):
        if _positive_int(item):
            phases.append(SeqLenPhase(item, 1))
            continue
        if not isinstance(item, dict) or set(item) != {"seq_len", "steps"}:
            raise SeqLenScheduleError(f"{KEY}[{index}] must be a length or {{seq_len: int, steps: int}}, got {item!r}")
        if not (_positive_int(item["seq_len"]) and _positive_int(item["steps"])):
            raise SeqLenScheduleError(f"{KEY}[{index}]: seq_len and steps must be positive integers, got {item!r}")
        phases.append(SeqLenPhase(item["seq_len"], item["steps"]))
    return phases


def phase_shape(phase: SeqLenPhase, index: int, tokens_per_step: int, tokens_per_micro: int, dp_size: int) -> StepShape:
    if tokens_per_step % phase.seq_len:
        raise SeqLenScheduleError(
            f"{KEY}[{index}].seq_len={phase.seq_len} does not divide the step's token budget {tokens_per_step} "
            "(train.global_batch_size x train.seq_len); pick a divisor of it or change the batch size"
        )
    global_batch = tokens_per_step // phase.seq_len
    micro_batch = max(1, tokens_per_micro // phase.seq_len)
    if global_batch % (micro_batch * dp_size):
        raise SeqLenScheduleError(
            f"{KEY}[{index}].seq_len={phase.seq_len}: its {global_batch} sequences per step do not split into "
            f"micro-batches of {micro_batch} over {dp_size} data-parallel rank(s); change seq_len or "
            "train.global_batch_size / train.micro_batch_size"
        )
    return StepShape(phase.seq_len, micro_batch, global_batch)


class SeqLenSchedule:
    """The shape of every step (1-based, as the trainer counts them), cycling through the phases."""

    def __init__(self, raw: Sequence, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_size: int = 1):
        self.phases = parse_phases(raw)
        self.tokens_per_step = global_batch_size * seq_len
        tokens_per_micro = micro_batch_size * seq_len
        self.shapes = [
            phase_shape(phase, index, self.tokens_per_step, tokens_per_micro, dp_size)
            for index, phase in enumerate(self.phases)
        ]
        self.cycle = sum(phase.steps for phase in self.phases)

    @classmethod
    def of(cls, train_cfg, dp_size: int = 1) -> "SeqLenSchedule":
        """The schedule of a TrainConfig; without train.seq_len_schedule, one phase at train.seq_len."""
        raw = train_cfg.seq_len_schedule or [train_cfg.seq_len]
        return cls(raw, train_cfg.seq_len, train_cfg.micro_batch_size, train_cfg.global_batch_size, dp_size)

    def shape(self, step: int) -> StepShape:
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        offset = (step - 1) % self.cycle
        for phase, shape in zip(self.phases, self.shapes):
            if offset < phase.steps:
                return shape
            offset -= phase.steps
        raise AssertionError("unreachable: offset is below the cycle length")

    @property
    def shape_by_seq_len(self) -> Dict[int, StepShape]:
        """One shape per distinct length (a length's shape depends on the length only), in first-use order."""
        return {shape.seq_len: shape for shape in self.shapes}


def check_schedule_layout(schedule: SeqLenSchedule, model_cfg, parallel_cfg) -> None:
    """Every length of the schedule must run on the parallel layout: split evenly over cp x tp (whole Mamba chunks
    per CP rank), and with parallel.cp_load_balance divisible by 2 x cp, or that phase would silently lose the
    load-balanced token order."""
    from latentforge.train.parallel.config import check_sequence

    cp = parallel_cfg.cp
    for index, phase in enumerate(schedule.phases):
        where = f"{KEY}[{index}].seq_len={phase.seq_len}"
        try:
            check_sequence(model_cfg, parallel_cfg, phase.seq_len)
        except ValueError as error:
            raise SeqLenScheduleError(f"{where}: {error}") from None
        if cp > 1 and parallel_cfg.cp_load_balance and phase.seq_len % (2 * cp):
            raise SeqLenScheduleError(
                f"{where} is not divisible by 2 x parallel.cp = {2 * cp}, which the load-balanced CP token order "
                f"needs; use a multiple of {2 * cp} or set parallel.cp_load_balance=false"
            )
