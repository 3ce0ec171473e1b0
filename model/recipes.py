"""Compose a Hydra recipe from `recipes/` outside of a `@hydra.main` app (CLIs, tests, notebooks)."""

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def compose(overrides=(), config_name: str = "config"):
    """`compose(["recipe=super_120b", "model.mtp_depths=1"])` -> the merged DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not RECIPES_DIR.is_dir():
        raise FileNotFoundError(f"recipes directory not found at {RECIPES_DIR}; install LatentForge with `pip install -e .`")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def model_config_from(cfg):
    """The `model` node of a composed recipe -> a validated ModelConfig (unknown keys are named)."""
    from omegaconf import OmegaConf

    from .config import ModelConfig

    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
