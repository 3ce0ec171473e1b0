"""Per-step sequence lengths for runs that mix lengths (train.seq_len_schedule), at a constant token budget per step.

A schedule is a list of phases ``{seq_len, steps}`` repeated in order until the run ends; ``[{seq_len: 1048576,
steps: 1}, {seq_len: 4096, steps: 1}]`` alternates the two lengths every step. The token budget of one step is
``train.global_batch_size x train.seq_len``; a phase keeps it by scaling the sequences per step and per micro-batch
(``micro_batch_size x seq_len`` tokens per micro-batch, floored at one sequence, where context parallelism takes over).
Not yet wired into the trainer or the data loader: this module only resolves and validates the plan.
"""
from dataclasses import dataclass
from typing import List, Sequence


class SeqLenScheduleError(ValueError):
    """A schedule that cannot keep the token budget; the message names the phase and the fix."""


@dataclass(frozen=True)
class StepShape:
    seq_len: int
    micro_batch_size: int  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int  # sequences per optimizer step over all data-parallel ranks


@dataclass(frozen=True)
class SeqLenPhase:
    seq_len: int
    steps: int


def parse_phases(raw: Sequence) -> List[SeqLenPhase]:
    if not raw:
        raise SeqLenScheduleError("train.seq_len_schedule is empty; give a list of {seq_len, steps} or leave it null")
    phases = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"seq_len", "steps"}:
            raise SeqLenScheduleError(f"train.seq_len_schedule[{index}] must be {{seq_len: int, steps: int}}, got {item!r}")
        if not all(isinstance(item[key], int) and item[key] > 0 for key in ("seq_len", "steps")):
            raise SeqLenScheduleError(f"train.seq_len_schedule[{index}]: seq_len and steps must be positive integers, "
                                      f"got {item!r}")
        phases.append(SeqLenPhase(item["seq_len"], item["steps"]))
    return phases


def phase_shape(phase: SeqLenPhase, index: int, tokens_per_step: int, tokens_per_micro: int, dp_size: int) -> StepShape:
    if tokens_per_step % phase.seq_len:
        raise SeqLenScheduleError(
            f"train.seq_len_schedule[{index}].seq_len={phase.seq_len} does not divide the step's token budget "
            f"{tokens_per_step} (global_batch_size x seq_len); pick a divisor of it")
    global_batch = tokens_per_step // phase.seq_len
    micro_batch = max(1, tokens_per_micro // phase.seq_len)
    if global_batch % (micro_batch * dp_size):
        raise SeqLenScheduleError(
            f"train.seq_len_schedule[{index}].seq_len={phase.seq_len}: {global_batch} sequences per step do not split "
            f"into micro-batches of {micro_batch} over {dp_size} data-parallel ranks; change seq_len or the batch sizes")
    return StepShape(phase.seq_len, micro_batch, global_batch)


class SeqLenSchedule:
    """The shape of every step (1-based, as the trainer counts them), cycling through the phases."""

    def __init__(self, raw: Sequence, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_size: int = 1):
        self.phases = parse_phases(raw)
        tokens_per_step, tokens_per_micro = global_batch_size * seq_len, micro_batch_size * seq_len
        self.shapes = [phase_shape(phase, index, tokens_per_step, tokens_per_micro, dp_size)
                       for index, phase in enumerate(self.phases)]
        self.cycle = sum(phase.steps for phase in self.phases)

    def shape(self, step: int) -> StepShape:
        if step < 1:
            raise SeqLenScheduleError(f"steps count from 1, got {step}")
        offset = (step - 1) % self.cycle
        for phase, shape in zip(self.phases, self.shapes):
            if offset < phase.steps:
                return shape
            offset -= phase.steps
        raise AssertionError("unreachable: offset is below the cycle length")
