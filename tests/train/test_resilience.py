"""The loop under failure: a failing logger never stops training or the save, the checkpoint is on disk before any
callback's end-of-run work, resume skips a damaged checkpoint, a NaN stop names the newest intact checkpoint."""

import os

import pytest

from latentforge.model.manifest import MANIFEST_FILE, CheckpointDamagedError
from latentforge.train.callbacks import Callback, PreemptionHandler
from latentforge.train.checkpoint import complete_checkpoints
from latentforge.train.config import TrainConfig
from latentforge.train.trainer import NonFiniteLossError

from .test_trainer import NonFiniteAt, Recorder, SignalAt, make_trainer


class Broken(Callback):
    """A logger whose service died: every hook raises, as W&B's `Connection lost` does."""

    def __init__(self, hooks):
        self.hooks, self.calls = set(hooks), []

    def _maybe_fail(self, hook):
        self.calls.append(hook)
        if hook in self.hooks:
            raise ConnectionResetError("Connection lost")

    def on_train_start(self, trainer):
        self._maybe_fail("on_train_start")

    def on_step_end(self, trainer, metrics):
        self._maybe_fail("on_step_end")

    def on_checkpoint(self, trainer, path):
        self._maybe_fail("on_checkpoint")

    def on_train_end(self, trainer, reason):
        self._maybe_fail("on_train_end")


class CheckpointAtEnd(Callback):
    """Records whether the final checkpoint was complete when the run's end-of-run work began."""

    def on_train_end(self, trainer, reason):
        folder = trainer.checkpoints.folder
        self.seen = [s for s, _ in complete_checkpoints(folder)]


def checkpoint_dir(tmp_path, step):
    return os.path.join(str(tmp_path / "ckpt"), f"step_{step:08d}")


@pytest.mark.parametrize("hook", ["on_train_start", "on_step_end", "on_checkpoint", "on_train_end"])
def test_a_failing_logger_is_reported_once_and_the_run_goes_on(tmp_path, capsys, hook):
    broken, recorder = Broken({hook}), Recorder()
    trainer, _ = make_trainer(tmp_path, steps=3, interval=2, callbacks=[broken, recorder])
    assert trainer.fit() == "finished"
    assert [m["step"] for m in recorder.metrics] == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "ckpt"))] == [2, 3]
    err = capsys.readouterr().err
    assert err.count("callback Broken failed") == 1 and "Connection lost" in err
    assert broken.calls.count(hook) == 1  # switched off after its failure


def test_sigterm_with_a_dead_logger_saves_before_the_end_of_run_work(tmp_path):
    at_end = CheckpointAtEnd()
    trainer, _ = make_trainer(
        tmp_path,
        steps=10,
        callbacks=[Broken({"on_step_end", "on_train_end"}), at_end, SignalAt(3), PreemptionHandler()],
    )
    assert trainer.fit() == "signal SIGTERM"
    assert at_end.seen == [3]
    assert os.path.isfile(os.path.join(checkpoint_dir(tmp_path, 3), MANIFEST_FILE))


def damage(path):
    shard = next(os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    return shard


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    trainer, _ = make_trainer(tmp_path, steps=4, interval=2)
    trainer.fit()
    shard = damage(checkpoint_dir(tmp_path, 4))

    strict, _ = make_trainer(tmp_path, steps=4, interval=2)
    strict.cfg = TrainConfig(**{**strict.cfg.__dict__, "strict_resume": True})
    with pytest.raises(CheckpointDamagedError, match=shard):
        strict.resume_if_possible()

    resumed, _ = make_trainer(tmp_path, steps=4, interval=2)
    assert resumed.resume_if_possible() == checkpoint_dir(tmp_path, 2)
    assert resumed.state.step == 2 and resumed.last_checkpoint == checkpoint_dir(tmp_path, 2)
    err = capsys.readouterr().err
    assert f"WARNING: checkpoint {checkpoint_dir(tmp_path, 4)} is damaged: {shard}" in err
    assert resumed.fit() == "finished" and resumed.state.step == 4


def test_a_nan_stop_names_the_newest_intact_checkpoint(tmp_path):
    first, _ = make_trainer(tmp_path, steps=10, stop_at=4, interval=2)
    first.fit()  # checkpoints 2 and 4
    damage(checkpoint_dir(tmp_path, 4))
    trainer, _ = make_trainer(
        tmp_path, steps=10, interval=100, max_nonfinite=2, runner_wrapper=lambda r: NonFiniteAt(r, {1, 2})
    )
    assert trainer.resume_if_possible() == checkpoint_dir(tmp_path, 2)
    with pytest.raises(NonFiniteLossError, match=f"newest intact checkpoint is {checkpoint_dir(tmp_path, 2)}$"):
        trainer.fit()
