"""Each step's cost in its phases: planted delays in the loader, the forward/backward, the clip, the optimizer and
the checkpoint save each land in their own phase, the phases add up to the step, metrics.jsonl and the step line
carry them."""

import time

from latentforge.train.callbacks import ConsoleLogger, JSONLWriter
from latentforge.train.callbacks.console import format_line
from latentforge.train.callbacks.jsonl import read_jsonl

from .test_trainer import Recorder, make_trainer

DELAY = {"data": 0.03, "fwd_bwd": 0.05, "clip": 0.02, "optimizer": 0.04, "checkpoint": 0.06}
PHASES = ("data_time", "fwd_bwd_time", "clip_time", "optimizer_time")


class SlowLoader:
    def __init__(self, loader, seconds):
        self.loader, self.seconds = loader, seconds

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.seconds)
        return next(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class SlowRunner:
    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward_backward(self, micro_batches):
        time.sleep(DELAY["fwd_bwd"])
        return self.runner.forward_backward(micro_batches)

    def clip_grad_norm_(self, max_norm):
        time.sleep(DELAY["clip"])
        return self.runner.clip_grad_norm_(max_norm)


def slowed(function, seconds):
    def call(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return call


def test_planted_delays_land_in_their_own_phase(tmp_path, capsys):
    recorder = Recorder()
    jsonl = tmp_path / "metrics.jsonl"
    trainer, _ = make_trainer(
        tmp_path,
        steps=4,
        interval=2,
        runner_wrapper=SlowRunner,
        callbacks=[recorder, JSONLWriter(str(jsonl)), ConsoleLogger()],
    )
    trainer.loader = SlowLoader(trainer.loader, DELAY["data"] / trainer.grad_accumulation)
    trainer.optimizer.step = slowed(trainer.optimizer.step, DELAY["optimizer"])
    trainer.checkpoints.save = slowed(trainer.checkpoints.save, DELAY["checkpoint"])
    assert trainer.fit() == "finished"

    metrics = recorder.metrics
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        for phase, delay in zip(PHASES, (DELAY["data"], DELAY["fwd_bwd"], DELAY["clip"], DELAY["optimizer"])):
            assert m[phase] >= delay, (phase, m)
        # the phases are consecutive slices of the step
        assert abs(sum(m[p] for p in PHASES) - m["step_time"]) < 1e-6
        assert m["comm_time"] is None  # one process: no collectives
    # the save after step 2 is reported with step 3; the others ran no save before them
    assert metrics[2]["checkpoint_time"] >= DELAY["checkpoint"]
    assert [m["checkpoint_time"] for m in (metrics[0], metrics[1], metrics[3])] == [0.0, 0.0, 0.0]

    records = read_jsonl(str(jsonl))
    assert [r["fwd_bwd_time"] for r in records] == [m["fwd_bwd_time"] for m in metrics]
    assert all(set(PHASES) | {"comm_time", "checkpoint_time", "step_time"} <= set(r) for r in records)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and all("fwd/bwd" in line and "opt" in line for line in lines)
    assert "; ckpt" in lines[2] and "; ckpt" not in lines[1]


def test_step_line_shows_communication_inside_the_forward_backward():
    metrics = {
        "step": 5,
        "loss": 1.0,
        "grad_norm": 0.5,
        "lr": 1e-3,
        "step_time": 0.5,
        "data_time": 0.01,
        "fwd_bwd_time": 0.3,
        "comm_time": 0.05,
        "clip_time": 0.04,
        "optimizer_time": 0.15,
        "checkpoint_time": 0.0,
    }
    line = format_line(metrics, total_steps=10)
    assert "500ms = data 10ms + fwd/bwd 300ms (comm 50ms) + clip 40ms + opt 150ms" in line
    assert "ckpt" not in line


class CompilingRunner(SlowRunner):
    """A runner whose forward/backward compiles a function the first time it sees a shape (as parallel.compile's
    blocks do on the first step)."""

    def __init__(self, runner):
        super().__init__(runner)
        import torch

        torch._dynamo.reset()
        self.compiled = torch.compile(lambda x: x.sin() * 2 + 1, backend="aot_eager")

    def forward_backward(self, micro_batches):
        import torch

        self.compiled(torch.ones(7))
        return self.runner.forward_backward(micro_batches)


def test_compile_time_is_reported_on_the_steps_that_compile(tmp_path, capsys):
    recorder = Recorder()
    trainer, _ = make_trainer(
        tmp_path, steps=3, interval=10, runner_wrapper=CompilingRunner, callbacks=[recorder, ConsoleLogger()]
    )
    assert trainer.fit() == "finished"
    first, *later = recorder.metrics
    assert first["compile_time"] > 0 and first["compile_time"] <= first["fwd_bwd_time"]
    assert [m["compile_time"] for m in later] == [None, None]  # same shapes: nothing compiles again
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert "(compile " in lines[0] and all("(compile " not in line for line in lines[1:])
