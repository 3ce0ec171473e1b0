"""Generation engine for the hybrid model: KV + Mamba state caches, continuous batching, MTP speculative
decoding with state rollback, in-flight weight updates. CPU and GPU, pure PyTorch. See engine.py."""

from .config import EngineConfig, EngineStats, GenerationResult, SamplingParams
from .engine import Engine

__all__ = ["Engine", "EngineConfig", "EngineStats", "GenerationResult", "SamplingParams"]
