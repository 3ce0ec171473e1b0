"""The parallel layer: validates a layout, builds the device mesh, splits and shards the plain model, and runs
forward/backward over micro-batches for the trainer (TP+SP, EP, PP, CP, FSDP2/HSDP, any combination).

    from latentforge.train.parallel import ParallelConfig, build_runner
    runner = build_runner(model, model_cfg, ParallelConfig(tp=2))

The contract with the trainer is in docs/INTERFACES.md ("train/parallel/ <-> the trainer").
"""

from .config import Layout, LayoutError, ParallelConfig, validate_layout
from .pipeline import split_stages
from .plan import format_plan, layout_plan
from .runner import Runner, build_runner, describe

__all__ = [
    "Layout",
    "LayoutError",
    "ParallelConfig",
    "Runner",
    "build_runner",
    "describe",
    "format_plan",
    "layout_plan",
    "split_stages",
    "validate_layout",
]
