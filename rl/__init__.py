"""LatentForge RL: the generation engine (`latentforge.model.engine`), GRPO and its workers. Import submodules directly."""
