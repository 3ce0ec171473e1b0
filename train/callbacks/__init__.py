"""Trainer callbacks (OLMo-core style): everything around the loop that is not the step itself.

Metric producers run first (speed/MFU, memory), then writers (console, JSONL, W&B, progress bar), then control
(SIGTERM). Every rank runs every callback; writers act only on the metrics rank.
"""

from .base import Callback
from .console import ConsoleLogger
from .jsonl import JSONLWriter
from .preemption import PreemptionHandler
from .progress import ProgressBar
from .speed import SpeedMonitor
from .wandb_logger import WandbLogger

__all__ = ["Callback", "ConsoleLogger", "JSONLWriter", "PreemptionHandler", "ProgressBar", "SpeedMonitor",
           "WandbLogger"]
