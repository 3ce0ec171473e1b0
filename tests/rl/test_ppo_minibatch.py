"""PPO mini-batches (rl.updates_per_batch) with decoupled clipping, and non-finite GRPO steps.

The reference is an independent plain-PyTorch two-step PPO on a copy of the model: full-sequence logits, the
decoupled objective written out by hand, torch.optim.AdamW."""

import copy
import math

import pytest
import torch

from latentforge.model import ModelConfig
from latentforge.rl.batch import collate, group_rows
from latentforge.rl.config import GRPOConfig
from latentforge.rl.trainer import PolicyTrainer
from latentforge.train.config import OptimConfig
from latentforge.train.trainer import NonFiniteLossError
from tests.rl.helpers import micro_model_cfg
from tests.rl.test_trainer import random_groups

# AdamW with eps = 1 moves by ~lr * g (eps 1e-8 would blow float noise in near-zero gradients up to +-lr)
CLIP_LOW, CLIP_HIGH, TIS_CAP, LR, EPS = 0.2, 0.28, 2.0, 1.0, 1.0


def _cfg(updates: int, **extra) -> GRPOConfig:
    return GRPOConfig(
        loss={"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "tis_cap": TIS_CAP, "kl_coef": 0.0},
        trainer={"micro_batch_size": 3},
        rollout={"sampling": {"max_new_tokens": 9}},
        mtp_loss_weight=0.0,
        updates_per_batch=updates,
        steps=2 * updates,
        **extra,
    )


def _optim() -> OptimConfig:
    return OptimConfig(lr=LR, min_lr=LR, eps=EPS, schedule="constant", weight_decay=0.0, grad_clip=0.0, warmup_steps=0)


def _model_cfg() -> ModelConfig:
    return micro_model_cfg(moe_aux_loss_coeff=0.0)


def _logprobs(model, batch):
    logits = model(batch["input_ids"]).logits.float()
    return torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)


def reference_two_step(model, rows):
    """Two AdamW steps on the two halves of `rows`, each clipped against the start-of-batch policy."""
    halves = [rows[: (len(rows) + 1) // 2], rows[(len(rows) + 1) // 2 :]]
    batches = [collate(h) for h in halves]
    with torch.no_grad():
        prox = [_logprobs(model, b) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS, betas=tuple(_optim().betas), weight_decay=0.0)
    clipped = 0.0
    for batch, prox_logp in zip(batches, prox):
        logp = _logprobs(model, batch)
        mask, adv = batch["loss_mask"], batch["advantages"]
        ratio = torch.exp(logp - prox_logp)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
        weight = torch.exp(prox_logp - batch["behaviour_logprobs"]).clamp(max=TIS_CAP)
        loss = (-weight * surrogate * mask).sum() / mask.sum()
        clipped += float(((ratio * adv > ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * adv) & (mask > 0)).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict(), clipped


def test_two_mini_batches_match_a_plain_pytorch_reference(tmp_path):
    torch.set_num_threads(1)
    groups = random_groups(n_groups=2, G=4)
    trainer = PolicyTrainer(_model_cfg(), _cfg(2), _optim(), str(tmp_path))
    reference = copy.deepcopy(trainer.model)
    rows = group_rows(groups, True, True)
    metrics = trainer.train_step(groups)
    want, want_clipped = reference_two_step(reference, rows)
    got = trainer.full_state_dict()
    assert trainer.version == 2 and metrics["optimizer_steps"] == 2
    assert metrics["ppo_clipped"] == want_clipped
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=2e-5), name


def test_clipping_acts_with_several_updates_and_never_with_one(tmp_path):
    torch.set_num_threads(1)
    groups = random_groups(n_groups=4, G=4, seed=1)
    optim = OptimConfig(lr=0.2, min_lr=0.2, schedule="constant", weight_decay=0.0, grad_clip=0.0, warmup_steps=0)
    clipped = {}
    for n in (1, 4):
        trainer = PolicyTrainer(_model_cfg(), _cfg(n), optim, str(tmp_path / str(n)))
        clipped[n] = trainer.train_step(groups)["ppo_clipped"]
    assert clipped[1] == 0 and clipped[4] > 0


def test_one_update_per_batch_runs_no_proximal_forward(tmp_path, monkeypatch):
    trainer = PolicyTrainer(_model_cfg(), _cfg(1), _optim(), str(tmp_path))
    calls = []
    monkeypatch.setattr(trainer.runner, "evaluate", lambda *a, **k: calls.append(a))
    trainer.train_step(random_groups(n_groups=2))
    assert calls == [] and trainer.version == 1


def _adam_state(trainer):
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for opt in trainer.optimizer.optimizers
        for s in opt.state.values()
    ]


def test_a_nan_advantage_skips_the_step_bitwise(tmp_path):
    torch.set_num_threads(1)
    trainer = PolicyTrainer(_model_cfg(), _cfg(1), _optim(), str(tmp_path))
    trainer.train_step(random_groups(n_groups=2, seed=2))  # AdamW state exists
    weights = {k: v.clone() for k, v in trainer.full_state_dict().items()}
    adam = _adam_state(trainer)
    poisoned = random_groups(n_groups=2, seed=3)
    poisoned[0].samples[0].reward = math.nan
    metrics = trainer.train_step(poisoned)
    assert metrics["skipped_steps"] == 1 and trainer.consecutive_nonfinite == 1
    after = trainer.full_state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    for before, now in zip(adam, _adam_state(trainer)):
        assert all(torch.equal(before[k], now[k]) for k in before)
    trainer.train_step(random_groups(n_groups=2, seed=4))  # a good step resets the count
    assert trainer.consecutive_nonfinite == 0


def test_too_many_nonfinite_steps_stop_naming_the_checkpoint(tmp_path):
    trainer = PolicyTrainer(_model_cfg(), _cfg(1, max_consecutive_nonfinite=2), _optim(), str(tmp_path))
    poisoned = random_groups(n_groups=2)
    poisoned[0].samples[0].reward = math.nan
    trainer.train_step(poisoned)
    with pytest.raises(NonFiniteLossError, match="2 non-finite GRPO steps in a row.*none written yet"):
        trainer.train_step(poisoned)


def test_updates_per_batch_is_validated():
    with pytest.raises(ValueError, match="rl.steps=5 .* multiple of rl.updates_per_batch=2"):
        GRPOConfig(updates_per_batch=2, steps=5)
    with pytest.raises(ValueError, match="updates_per_batch must be >= 1"):
        GRPOConfig(updates_per_batch=0)


def test_intervals_fire_when_a_batch_jumps_over_them():
    from latentforge.rl.loop import crossed

    assert crossed(2, 4, 3) and crossed(0, 2, 2) and not crossed(4, 6, 4) and crossed(6, 8, 4)
