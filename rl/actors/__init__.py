"""The Ray roles of GRPO: trainer ranks, rollout workers, reward workers (plain classes, wrapped by `remote`).

Imported lazily: a reward worker process loads only what scoring needs (no torch, no model)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ imports on first use, named for the type checker
    from .reward import RewardWorker
    from .rollout import RolloutWorker
    from .trainer import TrainerRank

_CLASSES = {"RewardWorker": "reward", "RolloutWorker": "rollout", "TrainerRank": "trainer"}


def __getattr__(name):
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def remote(cls: type, *, num_cpus: float, num_gpus: float = 0.0, max_concurrency: int = 1, **options: Any) -> Any:
    """`cls` as a Ray actor class with these resources (threaded when max_concurrency > 1). Its handles are
    untyped: Ray builds each method's `.remote` at run time."""
    import ray

    # Ray's typed overloads of remote(**options) are its task options; actor options (max_concurrency) and the
    # caller's **options are checked by Ray itself when the class is made
    return ray.remote(  # pyright: ignore[reportCallIssue]
        num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=max_concurrency, **options
    )(cls)


__all__ = ["RewardWorker", "RolloutWorker", "TrainerRank", "remote"]
