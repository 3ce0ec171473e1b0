import os

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from latentforge.train.checkpoint import CheckpointManager, complete_checkpoints, pack, unpack


def make_state(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        "trainer": pack({"step": seed, "note": f"state {seed}"}),
    }


def empty_state():
    return {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "trainer": b""}


def assert_loaded_equals(path, seed):
    state = empty_state()
    assert CheckpointManager.load(path, state) == set()
    expected = make_state(seed)
    torch.testing.assert_close(state["model"]["w"], expected["model"]["w"], rtol=0, atol=0)
    torch.testing.assert_close(state["model"]["b"], expected["model"]["b"], rtol=0, atol=0)
    assert unpack(state["trainer"]) == {"step": seed, "note": f"state {seed}"}


def test_keeps_last_k_and_loads_bitwise(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, make_state(step), write_extra=lambda d: open(os.path.join(d, "config.yaml"), "w").close())
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000003"]
    assert os.path.isfile(os.path.join(manager.latest(), "config.yaml"))
    assert_loaded_equals(manager.latest(), 3)


@pytest.mark.parametrize("failing", ["write_data", "finish"])
def test_crash_mid_save_leaves_previous_loadable(tmp_path, monkeypatch, failing):
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    manager.save(1, make_state(1))

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    with monkeypatch.context() as patch:
        # write_data: no shard written; finish: every shard written but the metadata never lands
        patch.setattr(FileSystemWriter, failing, crash)
        with pytest.raises(CheckpointException, match="injected"):
            manager.save(2, make_state(2))
    assert os.path.isdir(tmp_path / "step_00000002.tmp")  # the half-written save stays aside...
    assert manager.latest().endswith("step_00000001")  # ...and is never taken for a checkpoint
    assert_loaded_equals(manager.latest(), 1)

    manager.save(3, make_state(3))  # the next good save publishes, rotates, and cleans the leftover
    assert sorted(os.listdir(tmp_path)) == ["step_00000003"]
    assert_loaded_equals(manager.latest(), 3)


def test_async_save_snapshots_at_call_time(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2, async_save=True)
    state = make_state(5)
    manager.save(5, state)
    state["model"]["w"].add_(100.0)  # training goes on while the save is written
    manager.wait()
    assert_loaded_equals(manager.latest(), 5)
    manager.close()


def test_load_reports_entries_the_checkpoint_lacks(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    manager.save(1, make_state(1))
    state = {**empty_state(), "rng_rank7": b""}
    assert CheckpointManager.load(manager.latest(), state) == {"rng_rank7"}
    assert unpack(state["trainer"])["step"] == 1
