"""The Ray roles of GRPO: trainer ranks, rollout workers, reward workers (plain classes, wrapped by `remote`).

Imported lazily: a reward worker process loads only what scoring needs (no torch, no model)."""

_CLASSES = {"RewardWorker": "reward", "RolloutWorker": "rollout", "TrainerRank": "trainer"}


def __getattr__(name):
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def remote(cls, *, num_cpus: float, num_gpus: float = 0.0, max_concurrency: int = 1, **options):
    """`cls` as a Ray actor class with these resources (threaded when max_concurrency > 1)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=max_concurrency, **options)(cls)


__all__ = ["RewardWorker", "RolloutWorker", "TrainerRank", "remote"]
