"""LatentForge RL: the generation engine (`rl.engine`), GRPO and its workers. Import submodules directly."""
