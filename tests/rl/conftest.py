"""Fixtures shared by the tests of rl/."""

import os

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (started and shut down with it): the GRPO loop's actors run on it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": {"WANDB_MODE": "disabled"}},
    )
    yield
    ray.shutdown()
