"""Loss curves of the same small training run under different precisions (used by the test and the bench).

The data is a synthetic Markov chain (each token has `branching` equally likely successors), so the model has
something to learn (the loss falls from ln(V) towards ln(branching)) and every run sees identical batches.
The loop is a plain AdamW loop with the real run's hyper-parameters (betas 0.9/0.95, weight decay 0.1,
grad clip 1.0) and the expert-bias update; it is not the trainer.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch


def markov_batches(
    num_batches: int,
    batch: int,
    seq_len: int,
    vocab: int,
    *,
    branching: int = 4,
    used_vocab: Optional[int] = None,
    seed: int = 0,
) -> list:
    """[(input_ids (b, s), labels (b, s))]: labels[t] is input_ids[t + 1] of one Markov sequence."""
    used = min(vocab, used_vocab or vocab)
    successors = torch.randint(0, used, (used, branching), generator=torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, used, (batch,), generator=g)
        for t in range(seq_len):
            choice = torch.randint(0, branching, (batch,), generator=g)
            tokens[:, t + 1] = successors[tokens[:, t], choice]
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def train_loss_curve(
    model_cfg,
    precision_cfg,
    batches: list,
    *,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    log_every: int = 0,
):
    """Train a fresh model (same init for every precision) on `batches`; return (lm losses, seconds per step).

    `precision_cfg` None (or name bf16) trains without quantization.
    """
    from latentforge.model import HybridModel
    from latentforge.train.loss import model_loss

    from .apply import apply_precision

    torch.manual_seed(seed)
    model = HybridModel(model_cfg).to(device=device, dtype=dtype)
    if precision_cfg is not None:
        apply_precision(model, precision_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    start = time.perf_counter()
    for step, (inputs, labels) in enumerate(batches):
        out = model_loss(model, inputs.to(device), labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.expert_load is not None:
            model.update_expert_bias(out.expert_load)
        losses.append(float(out.lm_loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {step}")
        if log_every and (step % log_every == 0 or step == len(batches) - 1):
            print(f"  step {step:4d}  lm_loss {losses[-1]:.4f}", flush=True)
    seconds_per_step = (time.perf_counter() - start) / max(len(batches), 1)
    return losses, seconds_per_step


def tail_mean(values: list, n: int) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)
