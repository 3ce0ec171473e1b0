"""LatentForge model: config, plain nn.Module blocks, the hybrid stack, counting, Hugging Face interop.

Importing `latentforge.model` is cheap (no torch): the names below load their module on first use, so light
modules such as `latentforge.model.errors` or `latentforge.model.schema` can be imported from anywhere.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ loads on first use, named for the type checker
    from .config import ConfigError, ModelConfig
    from .hybrid import HybridModel, ModelOutput

_EXPORTS = {
    "ConfigError": "latentforge.model.config",
    "ModelConfig": "latentforge.model.config",
    "HybridModel": "latentforge.model.hybrid",
    "ModelOutput": "latentforge.model.hybrid",
}

__all__ = ["ConfigError", "HybridModel", "ModelConfig", "ModelOutput"]  # the keys of _EXPORTS


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentforge.model' has no attribute {name!r}")
