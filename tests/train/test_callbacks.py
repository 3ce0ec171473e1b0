import io
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from latentforge.train.callbacks import ConsoleLogger, JSONLWriter, PreemptionHandler, SpeedMonitor, WandbLogger
from latentforge.train.callbacks.console import format_line
from latentforge.train.callbacks.jsonl import read_jsonl
from latentforge.train.callbacks.wandb_logger import resolve_mode
from latentforge.train.config import WandbConfig
from latentforge.train.flops import peak_tflops_for


class FakeTrainer:
    def __init__(self, last_step=10):
        self.is_metrics_rank = True
        self.last_step = last_step
        self.total_steps = last_step
        self.state = SimpleNamespace(step=0)
        self.lines = []
        self.stop_reason = None

    def print(self, line, stream=None):
        self.lines.append(line)

    def request_stop(self, reason):
        self.stop_reason = reason


def step_metrics(step=3, **extra):
    return {
        "step": step,
        "loss": 5.25,
        "lm_loss": 5.0,
        "mtp_losses": [5.5, 6.0],
        "aux_loss": 1.01,
        "grad_norm": 0.75,
        "lr": 3e-3,
        "tokens": 4096,
        "step_time": 0.5,
        "skipped": False,
        "skipped_steps": 0,
        "moe_imbalance": 1.8,
        **extra,
    }


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA B200") == 2250.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA GeForce RTX 3090") is None


def test_speed_monitor_on_cpu_reports_na_and_eta():
    monitor = SpeedMonitor(flops_per_token=1e9, device=torch.device("cpu"), world_size=2)
    trainer = FakeTrainer(last_step=10)
    metrics = step_metrics(step=4)
    monitor.on_step_end(trainer, metrics)
    assert metrics["tokens_per_s"] == pytest.approx(4096 / 0.5)
    assert metrics["tokens_per_s_per_device"] == pytest.approx(4096 / 0.5 / 2)
    assert metrics["tflops_per_device"] is None and metrics["mfu"] is None
    assert metrics["eta_s"] == pytest.approx(6 * 0.5)
    assert metrics["memory_gib"] > 0  # the process's resident memory on CPU
    line = format_line(metrics, 10)
    for piece in (
        "step  4/10",
        "loss 5.2500",
        "lm 5.0000 mtp 5.5000 6.0000",
        "aux 1.010",
        "gnorm 0.750",
        "lr 3.00e-03",
        "8.2k tok/s",
        "TFLOP/s n/a",
        "MFU n/a",
        "GiB",
        "moe max/mean 1.80",
        "eta 3s",
    ):
        assert piece in line, (piece, line)


def test_mfu_math_with_a_known_peak(monkeypatch):
    # the CUDA branch's arithmetic with a pretend H100 (no GPU needed)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monitor = SpeedMonitor(flops_per_token=83.7e9, device=torch.device("cuda", 0), world_size=64)
    metrics = step_metrics(tokens=64 * 4497, step_time=1.0)
    monitor.on_step_end(FakeTrainer(), metrics)
    # NeMo AutoModel's published 4,497 tokens/s/GPU at 83.7 GFLOP/token is ~376 TFLOP/s -> 38% of 989
    assert metrics["tflops_per_device"] == pytest.approx(4497 * 83.7e9 / 1e12)
    assert metrics["mfu"] == pytest.approx(4497 * 83.7e9 / 1e12 / 989.0)
    assert "MFU 38.1%" in format_line(metrics, 10)


def test_mfu_counts_each_step_at_its_own_sequence_length(monkeypatch):
    # train.seq_len_schedule: a 1M-token step costs more FLOPs per token (attention) than a 4K one
    from functools import partial

    from latentforge.model.params import training_flops_per_token
    from latentforge.train.pretrain import load_configs

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = load_configs(["recipe=super_120b"]).model
    monitor = SpeedMonitor(partial(training_flops_per_token, cfg), torch.device("cuda", 0), world_size=1)
    tflops = {}
    for seq_len in (4096, 1048576):
        metrics = step_metrics(tokens=1000, step_time=1.0, seq_len=seq_len)
        monitor.on_step_end(FakeTrainer(), metrics)
        tflops[seq_len] = metrics["tflops_per_device"]
        assert tflops[seq_len] == pytest.approx(1000 * training_flops_per_token(cfg, seq_len) / 1e12)
    assert tflops[1048576] > 1.5 * tflops[4096]


def test_console_and_jsonl_respect_interval_and_last_step(tmp_path):
    trainer = FakeTrainer(last_step=5)
    console = ConsoleLogger(log_interval=2)
    jsonl = JSONLWriter(str(tmp_path / "m.jsonl"), log_interval=2)
    jsonl.on_train_start(trainer)
    for step in range(1, 6):
        metrics = step_metrics(
            step=step, loss=1.0 / step, grad_norm=float("nan") if step == 3 else 1.0, skipped=step == 3
        )
        console.on_step_end(trainer, metrics)
        jsonl.on_step_end(trainer, metrics)
    jsonl.on_train_end(trainer, "finished")
    rows = read_jsonl(str(tmp_path / "m.jsonl"))
    assert [r["step"] for r in rows] == [2, 3, 4, 5]  # every 2nd, a skipped step always, and the last
    assert rows[0]["loss"] == 0.5 and rows[-1]["loss"] == 0.2  # exact floats survive the round trip
    assert rows[1]["grad_norm"] == "nan"
    assert len(trainer.lines) == 4 and "SKIPPED" in trainer.lines[1]


def test_writers_stay_silent_off_the_metrics_rank(tmp_path):
    trainer = FakeTrainer()
    trainer.is_metrics_rank = False
    jsonl = JSONLWriter(str(tmp_path / "m.jsonl"))
    jsonl.on_train_start(trainer)
    jsonl.on_step_end(trainer, step_metrics())
    ConsoleLogger().on_step_end(trainer, step_metrics())
    assert not os.path.exists(tmp_path / "m.jsonl") and trainer.lines == []


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(None) == "offline"  # no credentials: offline by default
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"  # the environment wins
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_mode(None)


def test_wandb_offline_run_id_survives_a_resume(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = WandbLogger(WandbConfig(), "unit", str(tmp_path), {"a": 1})
    trainer = FakeTrainer()
    first.on_train_start(trainer)
    first.on_step_end(trainer, step_metrics(step=1))
    first.on_train_end(trainer, "signal SIGTERM")
    saved = first.state_dict()
    assert saved["run_id"]

    second = WandbLogger(WandbConfig(), "unit", str(tmp_path), {"a": 1})
    second.load_state_dict(saved)
    second.on_train_start(trainer)
    assert second._run.id == saved["run_id"]
    second.on_train_end(trainer, "finished")
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 2 and all(d.endswith(saved["run_id"]) for d in runs)


def test_sigterm_requests_a_stop():
    handler = PreemptionHandler()
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    try:
        handler.on_step_end(trainer, step_metrics())
        assert trainer.stop_reason is None
        os.kill(os.getpid(), signal.SIGTERM)
        handler.on_step_end(trainer, step_metrics())
        assert trainer.stop_reason == "signal SIGTERM"
    finally:
        handler.on_train_end(trainer, "finished")
    assert signal.getsignal(signal.SIGTERM) is not handler._handle


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    from latentforge.train.callbacks import ProgressBar

    trainer = FakeTrainer(last_step=4)
    trainer.print_hook = None
    plain = ProgressBar(stream=io.StringIO())
    plain.on_train_start(trainer)
    assert plain._bar is None and trainer.print_hook is None  # logs stay plain lines

    terminal = FakeTerminal()
    bar = ProgressBar(stream=terminal)
    bar.on_train_start(trainer)
    assert bar._bar is not None and trainer.print_hook is not None  # console lines go above the bar
    bar.on_step_end(trainer, step_metrics(step=2))
    assert bar._bar.n == 2
    bar.on_train_end(trainer, "finished")
    assert trainer.print_hook is None and "0/4" in terminal.getvalue()
