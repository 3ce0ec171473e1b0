"""bench/timing.py: the median of the timed calls, warm-up calls excluded (a fake clock, no wall time)."""

import pytest
import torch

from bench import timing


class FakeClock:
    """perf_counter that advances only when the timed function runs, by the next of the given durations."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def work(self):
        self.now += self.durations[self.calls]
        self.calls += 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path times with perf_counter")
@pytest.mark.parametrize(
    "warmup, durations, median",
    [
        (0, [5.0, 1.0, 3.0], 3.0),
        (2, [100.0, 50.0, 2.0, 9.0, 4.0, 7.0, 1.0], 4.0),  # the slow first calls are warm-up, not timed
        (1, [8.0, 6.0], 6.0),
    ],
)
def test_median_of_the_timed_calls(monkeypatch, warmup, durations, median):
    clock = FakeClock(durations)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert timing.median_seconds(clock.work, reps=len(durations) - warmup, warmup=warmup) == median
    assert clock.calls == len(durations)


def test_no_timed_call_is_an_error():
    with pytest.raises(ValueError, match="reps must be >= 1"):
        timing.median_seconds(lambda: None, reps=0)
