"""LatentForge model: config, plain nn.Module blocks, the hybrid stack, counting, Hugging Face interop."""

from .config import ConfigError, ModelConfig
from .hybrid import HybridModel, ModelOutput

__all__ = ["ConfigError", "ModelConfig", "HybridModel", "ModelOutput"]
