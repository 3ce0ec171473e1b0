import pytest

from latentforge.train.seq_schedule import SeqLenSchedule, SeqLenScheduleError, StepShape


def reference_shapes(phases, steps, seq_len, micro, global_batch):
    """Expand the phases by hand, step by step, into (seq_len, micro, global) at the same token budget."""
    tokens, out = seq_len * global_batch, []
    while len(out) < steps:
        for phase in phases:
            for _ in range(phase["steps"]):
                length = phase["seq_len"]
                out.append(StepShape(length, max(1, micro * seq_len // length), tokens // length))
    return out[:steps]


def test_alternation_keeps_token_budget_and_matches_hand_expansion():
    phases = [{"seq_len": 1024, "steps": 1}, {"seq_len": 64, "steps": 1}]
    schedule = SeqLenSchedule(phases, seq_len=64, micro_batch_size=4, global_batch_size=32)
    got = [schedule.shape(step) for step in range(1, 9)]
    assert got == reference_shapes(phases, 8, 64, 4, 32)
    assert {shape.seq_len * shape.global_batch_size for shape in got} == {64 * 32}
    assert got[0] == StepShape(1024, 1, 2) and got[1] == StepShape(64, 4, 32)


def test_phases_of_several_steps_cycle():
    phases = [{"seq_len": 128, "steps": 3}, {"seq_len": 512, "steps": 2}]
    schedule = SeqLenSchedule(phases, seq_len=128, micro_batch_size=2, global_batch_size=8)
    got = [schedule.shape(step).seq_len for step in range(1, 12)]
    assert got == [128, 128, 128, 512, 512, 128, 128, 128, 512, 512, 128]


@pytest.mark.parametrize("raw, fragment", [
    ([], "is empty"),
    ([{"seq_len": 0, "steps": 1}], "positive integers"),
    ([{"seq_len": 64}], "must be {seq_len: int, steps: int}"),
    ([{"seq_len": 96, "steps": 1}], "does not divide the step's token budget"),
    ([{"seq_len": 256, "steps": 1}], "do not split into micro-batches"),
])
def test_bad_schedules_give_one_clear_line(raw, fragment):
    with pytest.raises(SeqLenScheduleError) as error:
        SeqLenSchedule(raw, seq_len=64, micro_batch_size=2, global_batch_size=8, dp_size=4)
    assert fragment in str(error.value) and "\n" not in str(error.value)
