"""LatentForge RL: the generation engine (`latentforge.rl.engine`), GRPO and its workers. Import submodules directly."""
