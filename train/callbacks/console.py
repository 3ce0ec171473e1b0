"""One plain line per logged step on the metrics rank."""

from __future__ import annotations

import sys

from .base import Callback


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


# (metrics key, label) of the step-time phases, in the order they run; absent / None phases are left out
BREAKDOWN = (
    ("data_time", "data"),
    ("fwd_bwd_time", "fwd/bwd"),
    ("comm_time", "comm"),
    ("compile_time", "compile"),
    ("clip_time", "clip"),
    ("optimizer_time", "opt"),
    ("checkpoint_time", "ckpt"),
)


def format_breakdown(metrics: dict) -> str:
    """`1.234s = data 3ms + fwd/bwd 1.1s (comm 20ms) (compile 0.9s) + clip 5ms + opt 120ms`; a checkpoint save, when one ran
    since the last line, after a `;`."""

    def ms(seconds):
        return f"{seconds * 1e3:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"

    phases = []
    for key, label in BREAKDOWN[:-1]:
        value = metrics.get(key)
        if value is None:
            continue
        inside_fwd_bwd = key in ("comm_time", "compile_time")
        phases.append(f"({label} {ms(value)})" if inside_fwd_bwd else f"{label} {ms(value)}")
    text = f"{ms(metrics['step_time'])} = " + " + ".join(phases).replace(" + (", " (")
    if metrics.get("checkpoint_time"):
        text += f"; ckpt {ms(metrics['checkpoint_time'])}"
    return text


def format_line(metrics: dict, total_steps: int) -> str:
    parts = [f"step {metrics['step']:>{len(str(total_steps))}}/{total_steps}"]
    if metrics.get("skipped"):
        parts.append(f"SKIPPED (non-finite, {metrics['skipped_steps']} so far)")
    parts.append(f"loss {metrics['loss']:.4f}")
    if metrics.get("mtp_losses"):
        parts.append("lm {:.4f} mtp {}".format(metrics["lm_loss"], " ".join(f"{x:.4f}" for x in metrics["mtp_losses"])))
    if metrics.get("aux_loss") is not None:
        parts.append(f"aux {metrics['aux_loss']:.3f}")
    parts.append(f"gnorm {metrics['grad_norm']:.3f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        parts.append(f"{format_rate(metrics['tokens_per_s'])} tok/s")
        tflops = metrics.get("tflops_per_device")
        parts.append(f"{tflops:.1f} TFLOP/s" if tflops is not None else "TFLOP/s n/a")
        mfu = metrics.get("mfu")
        parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
    if "step_time" in metrics:
        parts.append(format_breakdown(metrics))
    if metrics.get("memory_gib") is not None:
        parts.append(f"mem {metrics['memory_gib']:.2f} GiB")
    if metrics.get("moe_imbalance") is not None:
        parts.append(f"moe max/mean {metrics['moe_imbalance']:.2f}")
    if "eta_s" in metrics:
        parts.append(f"eta {format_duration(metrics['eta_s'])}")
    return " | ".join(parts)


class ConsoleLogger(Callback):
    order = 60

    def __init__(self, log_interval: int = 1, stream=None):
        self.log_interval = log_interval
        self.stream = stream

    def on_step_end(self, trainer, metrics: dict) -> None:
        if not trainer.is_metrics_rank:
            return
        step = metrics["step"]
        if step % self.log_interval and step != trainer.last_step and not metrics.get("skipped"):
            return
        trainer.print(format_line(metrics, trainer.total_steps), stream=self.stream or sys.stdout)
