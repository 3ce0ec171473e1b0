"""Compose a Hydra recipe from `recipes/` outside of a `@hydra.main` app (CLIs, tests, notebooks).

The dataclasses are the schema: each recipe group composes onto a node holding its dataclass's defaults (registered
in Hydra's ConfigStore as `<group>/schema`; every group file starts with `defaults: [schema, _self_]`), so YAML files
hold only what they change and every field can still be overridden on the command line without a `+`.
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Recipe group -> the dataclass that is its schema. Named, not imported: the groups' owners sit above `model`
# in the dependency order, and only composing a recipe needs them.
GROUP_SCHEMAS = {
    "model": "latentforge.model.config:ModelConfig",
    "parallel": "latentforge.train.parallel.config:ParallelConfig",
    "precision": "latentforge.train.precision.config:PrecisionConfig",
    "data": "latentforge.data.config:DataConfig",
    "optim": "latentforge.train.config:OptimConfig",
    "train": "latentforge.train.config:TrainConfig",
    "sft": "latentforge.train.sft:SFTConfig",
    "lora": "latentforge.train.lora.config:LoRAConfig",
    "rl": "latentforge.rl.config:GRPOConfig",
}
SCHEMA_NAME = "schema"


def schema_class(group: str) -> type:
    """The dataclass behind a recipe group (`schema_class("train")` -> TrainConfig)."""
    module, _, name = GROUP_SCHEMAS[group].partition(":")
    return getattr(importlib.import_module(module), name)


def register_schemas() -> None:
    """Store every group's dataclass defaults as `<group>/schema` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from .schema import defaults_of

    store = ConfigStore.instance()
    for group in GROUP_SCHEMAS:
        store.store(group=group, name=SCHEMA_NAME, node=defaults_of(schema_class(group)))


def refuse_moved_keys(overrides) -> None:
    """An override of a field that moved (`rl.rollout.max_batch`, now `rl.rollout.engine.max_batch`) is one line
    saying where it went, instead of Hydra's advice to add it with `+`."""
    from .schema import SchemaError, moved_key

    for override in overrides:
        group, *path = override.partition("=")[0].lstrip("+~").split(".")
        message = moved_key(schema_class(group), path, group) if group in GROUP_SCHEMAS and path else None
        if message:
            raise SchemaError(message)


def compose(overrides=(), config_name: Optional[str] = "config", config_dir=None) -> "DictConfig":
    """`compose(["recipe=super_120b", "model.mtp_depths=1"])` -> the merged DictConfig (`config_dir`: another
    recipes tree than the installed one)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = Path(config_dir or RECIPES_DIR)
    if not config_dir.is_dir():
        raise FileNotFoundError(
            f"recipes directory not found at {config_dir}; install LatentForge with `pip install -e .`"
        )
    register_schemas()
    refuse_moved_keys(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def plain_values(node) -> dict:
    """A composed recipe (or one of its groups) as plain Python containers, interpolations resolved."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True)
    if not isinstance(values, dict):
        raise TypeError(f"expected a mapping node, got {type(values).__name__}")
    return values


def group_values(group: str, name: str) -> dict:
    """One group file composed onto its schema, as plain values (`group_values("precision", "nvfp4")`)."""
    return plain_values(compose([f"+{group}={name}"], config_name=None)[group])


def model_config_from(cfg):
    """The `model` node of a composed recipe -> a validated ModelConfig (unknown keys are named)."""
    from .config import ModelConfig

    return ModelConfig.from_dict(plain_values(cfg.model))
