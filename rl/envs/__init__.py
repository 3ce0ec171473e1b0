"""Multi-turn, tool-using RL environments: the interface, the registry, the built-ins (task, python_tool,
guess_number) and the episode runner that turns them into token-exact training samples."""

from .base import Environment, EnvSpecError, StepResult, env_class, make_env, register_env
from .tool_env import ToolEnv, ToolError

__all__ = ["Environment", "EnvSpecError", "StepResult", "ToolEnv", "ToolError", "env_class", "make_env", "register_env"]
