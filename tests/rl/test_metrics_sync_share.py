"""GRPO's weight push as a share of the step: in the metrics and on the console line."""

from latentforge.rl.metrics import console_line, sync_share


def test_sync_share_is_the_push_over_the_step_wall_time():
    assert sync_share(0.05, 2.5) == 0.02
    assert sync_share(0.05, 0.0) is None  # no duration yet: no share


def test_console_line_shows_the_share():
    line = console_line({"step": 3, "sync_s": 0.04, "sync_share": sync_share(0.05, 2.5), "wall_s": 7.5}, 10)
    assert "sync 0.040s | sync_share 2.0%" in line
