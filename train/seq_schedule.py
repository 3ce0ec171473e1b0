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

A phase `{seq_len: L, steps: n, cp: false}` runs without context parallelism: each CP rank then reads sequences of
its own, as one more data-parallel rank (the phase splits its sequences over dp x cp ranks), and the model runs
without the CP mixer context; its micro-batch keeps the tokens one rank held under CP (train.micro_batch_size x
train.seq_len / cp), so its activation memory stays what the CP phases were sized for. That is what short phases of a long-context run want (a 4K step on CP64 would
otherwise cut each sequence into 64-token pieces). Bare lengths and phases without `cp` keep CP on.
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
    context_parallel: bool = True  # False: the CP ranks read sequences of their own (a phase with cp: false)
    cp_ranks_as_dp: int = 1  # ranks per data-parallel rank reading distinct sequences: parallel.cp when CP is off

    def grad_accumulation(self, dp_size: int) -> int:
        """Micro-batches per step on one rank, `dp_size` being the layout's data-parallel size (without CP)."""
        return self.global_batch_size // (self.micro_batch_size * dp_size * self.cp_ranks_as_dp)


@dataclass(frozen=True)
class SeqLenPhase:
    seq_len: int
    steps: int
    context_parallel: bool = True


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
        keys = set(item) if isinstance(item, dict) else set()
        if not ({"seq_len", "steps"} <= keys <= {"seq_len", "steps", "cp"}):
            raise SeqLenScheduleError(
                f"{KEY}[{index}] must be a length or {{seq_len: int, steps: int}} (optionally cp: false), got {item!r}"
            )
        if not (_positive_int(item["seq_len"]) and _positive_int(item["steps"])):
            raise SeqLenScheduleError(f"{KEY}[{index}]: seq_len and steps must be positive integers, got {item!r}")
        use_cp = item.get("cp", True)
        if not isinstance(use_cp, bool):
            raise SeqLenScheduleError(f"{KEY}[{index}].cp must be true or false, got {use_cp!r}")
        phases.append(SeqLenPhase(item["seq_len"], item["steps"], use_cp))
    cp_by_length: Dict[int, bool] = {}
    for index, phase in enumerate(phases):
        if cp_by_length.setdefault(phase.seq_len, phase.context_parallel) != phase.context_parallel:
            # each length is one data stream read by the same ranks (data.mixed_length.MixedLengthLoader)
            raise SeqLenScheduleError(
                f"{KEY}[{index}]: seq_len={phase.seq_len} appears both with and without cp; give every phase of "
                "one length the same cp"
            )
    return phases


def phase_shape(
    phase: SeqLenPhase, index: int, tokens_per_step: int, tokens_per_micro: int, dp_size: int, cp: int = 1
) -> StepShape:
    """The phase's shape; a phase without CP spreads its sequences over dp_size x cp ranks."""
    cp_ranks_as_dp = 1 if phase.context_parallel else cp
    if tokens_per_step % phase.seq_len:
        raise SeqLenScheduleError(
            f"{KEY}[{index}].seq_len={phase.seq_len} does not divide the step's token budget {tokens_per_step} "
            "(train.global_batch_size x train.seq_len); pick a divisor of it or change the batch size"
        )
    global_batch = tokens_per_step // phase.seq_len
    # a rank's activations hold tokens_per_micro / cp tokens under CP; a phase without CP keeps that per rank
    micro_batch = max(1, tokens_per_micro // cp_ranks_as_dp // phase.seq_len)
    ranks = dp_size * cp_ranks_as_dp
    if global_batch % (micro_batch * ranks):
        over = (
            f"{dp_size} data-parallel x {cp} CP rank(s) (cp: false)"
            if cp_ranks_as_dp > 1
            else f"{ranks} data-parallel rank(s)"
        )
        raise SeqLenScheduleError(
            f"{KEY}[{index}].seq_len={phase.seq_len}: its {global_batch} sequences per step do not split into "
            f"micro-batches of {micro_batch} over {over}; change seq_len or "
            "train.global_batch_size / train.micro_batch_size"
        )
    return StepShape(phase.seq_len, micro_batch, global_batch, phase.context_parallel, cp_ranks_as_dp)


class SeqLenSchedule:
    """The shape of every step (1-based, as the trainer counts them), cycling through the phases."""

    def __init__(
        self, raw: Sequence, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_size: int = 1, cp: int = 1
    ):
        self.phases = parse_phases(raw)
        self.tokens_per_step = global_batch_size * seq_len
        tokens_per_micro = micro_batch_size * seq_len
        self.shapes = [
            phase_shape(phase, index, self.tokens_per_step, tokens_per_micro, dp_size, cp)
            for index, phase in enumerate(self.phases)
        ]
        self.cycle = sum(phase.steps for phase in self.phases)
        longest = max(phase.seq_len for phase in self.phases)
        for index, phase in enumerate(self.phases):
            if longest % phase.seq_len:
                raise SeqLenScheduleError(
                    f"{KEY}[{index}].seq_len={phase.seq_len} does not divide the schedule's longest length {longest}, "
                    "whose rows every length reads in slices (data/mixed_length.py); use a divisor of it"
                )

    @classmethod
    def of(cls, train_cfg, dp_size: int = 1, cp: int = 1) -> "SeqLenSchedule":
        """The schedule of a TrainConfig; without train.seq_len_schedule, one phase at train.seq_len."""
        raw = train_cfg.seq_len_schedule or [train_cfg.seq_len]
        return cls(raw, train_cfg.seq_len, train_cfg.micro_batch_size, train_cfg.global_batch_size, dp_size, cp)

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

    for index, phase in enumerate(schedule.phases):
        where = f"{KEY}[{index}].seq_len={phase.seq_len}"
        phase_cfg = parallel_cfg if phase.context_parallel else without_cp(parallel_cfg)
        cp = phase_cfg.cp
        try:
            check_sequence(model_cfg, phase_cfg, phase.seq_len)
        except ValueError as error:
            fix = "" if phase.context_parallel else " (the phase runs with cp: false)"
            raise SeqLenScheduleError(f"{where}{fix}: {error}") from None
        if cp > 1 and parallel_cfg.cp_load_balance and phase.seq_len % (2 * cp):
            raise SeqLenScheduleError(
                f"{where} is not divisible by 2 x parallel.cp = {2 * cp}, which the load-balanced CP token order "
                f"needs; use a multiple of {2 * cp} or set parallel.cp_load_balance=false"
            )


def without_cp(parallel_cfg):
    """The parallel config a phase with cp: false runs under: CP off, its ranks data-parallel (dp_shard x cp)."""
    import dataclasses

    if parallel_cfg.cp == 1:
        return parallel_cfg
    dp_shard = parallel_cfg.dp_shard if parallel_cfg.dp_shard < 1 else parallel_cfg.dp_shard * parallel_cfg.cp
    return dataclasses.replace(parallel_cfg, cp=1, dp_shard=dp_shard)
