"""GRPO's weight push as a share of the step: in the metrics and on the console line."""

import pytest

from latentforge.rl.metrics import console_line, sync_share


def test_sync_share_is_the_push_over_the_step_wall_time():
    assert sync_share(0.05, 2.5) == 0.02
    assert sync_share(0.05, 0.0) is None  # no duration yet: no share


def test_console_line_shows_the_share():
    line = console_line({"step": 3, "sync_s": 0.04, "sync_share": sync_share(0.05, 2.5), "wall_s": 7.5}, 10)
    assert "sync 0.040s | sync_share 2.0%" in line


def test_draft_gate_metrics_average_the_gated_workers():
    from latentforge.rl.metrics import draft_gate_metrics

    workers = [
        {"draft_on": True, "expected_draft_speedup": 1.6},
        {"draft_on": False, "expected_draft_speedup": 0.8},
        {"draft_on": True, "expected_draft_speedup": None},
    ]
    assert draft_gate_metrics(workers) == {
        "draft_on": pytest.approx(2 / 3),
        "draft_expected_speedup": pytest.approx(1.2),
    }
    assert draft_gate_metrics([{"draft_on": None}]) == {}  # no gate: nothing logged
    line = console_line({"step": 1, "draft_on": 0.5, "draft_expected_speedup": 1.25}, 4)
    assert "draft_on 0.50 | draft_x 1.25" in line


def test_rollout_config_takes_the_draft_gate():
    from latentforge.rl.config import RolloutConfig

    assert RolloutConfig().engine.draft_gate is False
    assert RolloutConfig(engine={"draft_gate": True}).engine.draft_gate is True
