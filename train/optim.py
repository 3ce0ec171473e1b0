"""AdamW over the model parts a rank owns, with weight decay only where it belongs.

No weight decay on: norms (every `*norm*.weight`), biases, the Mamba `A_log`, `D` and `dt_bias`, and every 1-D
parameter (decaying a gain or a per-head scalar towards 0 changes what it means). The MoE expert bias
(`e_score_correction_bias`) is a buffer trained by the balancing rule, so it never reaches the optimizer.

One AdamW per model part (a pipeline rank may own several stages); `OptimizerContainer` steps them together and
saves them under parameter names (DCP's flattened optimizer state dict), so a checkpoint written under one
parallel layout loads under another.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from .config import OptimConfig

NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias")


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    owner, _, leaf = name.rpartition(".")
    if leaf in NO_DECAY_NAMES:
        return False
    if "norm" in owner.rpartition(".")[2]:  # norm, enorm, hnorm, norm_f, final_layernorm
        return False
    return param.dim() >= 2


def param_groups(module: nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (decay if wants_weight_decay(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def step_if_finite(optimizer, loss: float, grad_norm: float, lr: float) -> bool:
    """One optimizer step at `lr` when the loss and the global gradient norm are finite; otherwise the gradients
    are dropped and the weights and the optimizer state stay bitwise as they were (a NaN moment would poison
    every later step). Returns whether it stepped. The norm is global, so every rank decides alike. Pretraining
    and GRPO both step through here."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad()
        return False
    optimizer.set_lr(lr)
    optimizer.step()
    return True


class OptimizerContainer:
    """AdamW for each model part, stepped, zeroed, saved and loaded as one."""

    def __init__(self, model_parts: list, cfg: OptimConfig):
        self.model_parts = list(model_parts)
        self.optimizers = []
        for part in self.model_parts:
            groups = param_groups(part, cfg.weight_decay)
            if not groups:
                raise ValueError(f"model part {type(part).__name__} has no trainable parameters")
            self.optimizers.append(
                torch.optim.AdamW(
                    groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=cfg.foreach
                )
            )

    def set_lr(self, lr: float):
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # ----- checkpoint (torch.distributed.checkpoint Stateful) -----------------------------------------------
    _options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict:
        """In the model's natural layout (tensor-parallel Mamba rows are stored rank-contiguous: tensor_parallel.py),
        so a checkpoint loads under any other layout."""
        from latentforge.train.parallel.tensor_parallel import natural_optimizer_state

        merged = {}
        for part, opt in zip(self.model_parts, self.optimizers):
            merged.update(natural_optimizer_state(part, get_optimizer_state_dict(part, opt, options=self._options)))
        return merged

    def load_state_dict(self, state_dict: dict):
        from latentforge.train.parallel.tensor_parallel import stored_optimizer_state

        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(
                part, opt, optim_state_dict=stored_optimizer_state(part, state_dict), options=self._options
            )
