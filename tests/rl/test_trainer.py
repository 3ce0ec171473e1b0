"""The GRPO trainer step: micro-batching does not change the update, MTP trains on detached features only."""

import copy
import random

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.rl.buffer import Group, Sample
from latentforge.rl.config import GRPOConfig
from latentforge.rl.policy import mtp_detached_losses
from latentforge.rl.trainer import PolicyTrainer
from latentforge.train.loss import model_loss
from tests.rl.helpers import micro_model_cfg
from latentforge.train.config import OptimConfig


def random_groups(n_groups=3, G=4, vocab=128, seed=0):
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 6))]
        samples = []
        for i in range(G):
            n = rng.randint(1, 9)
            samples.append(
                Sample(
                    g,
                    i,
                    prompt,
                    [rng.randrange(4, vocab) for _ in range(n)],
                    [-rng.uniform(2, 6) for _ in range(n)],
                    [rng.choice([0, 0, -1]) for _ in range(n)],
                    finish_reason=rng.choice(["stop", "length"]),
                    reward=float(rng.random() < 0.5),
                )
            )
        samples[0].reward, samples[1].reward = 1.0, 0.0  # every group has signal
        groups.append(Group(g, samples))
    return groups


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batching_does_not_change_the_update(tmp_path, aggregation):
    """Global normalisers make the update independent of how rows are split into micro-batches (the MoE balance
    loss is per micro-batch by definition, as in pretraining, so it is off here)."""
    torch.set_num_threads(1)
    model_cfg = micro_model_cfg(moe_aux_loss_coeff=0.0)
    results = []
    for mb in (2, 16):
        cfg = GRPOConfig(
            loss={"aggregation": aggregation, "kl_coef": 0.05},
            trainer={"micro_batch_size": mb},
            rollout={"sampling": {"max_new_tokens": 9}},
            mtp_loss_weight=0.3,
        )
        # AdamW's first step is lr * g / (|g| + eps): with eps = 1 the update is ~g itself, so comparing weights
        # compares gradients (with a tiny eps, float noise in near-zero gradients would be amplified to +-lr)
        optim = OptimConfig(lr=1.0, min_lr=0.0, eps=1.0, schedule="constant", weight_decay=0.0, grad_clip=0.0)
        trainer = PolicyTrainer(model_cfg, cfg, optim, str(tmp_path / str(mb)))
        metrics = trainer.train_step(random_groups())
        results.append((trainer.full_state_dict(), metrics))
    (a, ma), (b, mb_) = results
    assert ma["tokens"] == mb_["tokens"] > 0 and ma["ppo_clipped"] == mb_["ppo_clipped"]
    assert ma["policy_loss"] == pytest.approx(mb_["policy_loss"], rel=1e-5, abs=1e-7)
    assert ma["grad_norm"] == pytest.approx(mb_["grad_norm"], rel=1e-4)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_mtp_loss_moves_only_the_mtp_block():
    torch.manual_seed(0)
    model = HybridModel(micro_model_cfg())
    reference = copy.deepcopy(model)
    ids = torch.randint(4, 128, (2, 10))
    out = model(ids)
    labels = torch.roll(ids, -1, dims=1)
    loss = sum(mtp_detached_losses(model, ids, labels, out.hidden))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        assert p.grad is None or not p.grad.any(), f"MTP loss reached the trunk: {name}"
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if n.startswith("mtp."))
    # and it is the same value as the model's own MTP loss (same recursion, just detached)
    full = model_loss(reference, ids, labels)
    assert loss.item() == pytest.approx(sum(full.mtp_losses).item(), rel=1e-5)


def _dp_step(rank, world_size, run_dir):
    torch.manual_seed(0)
    trainer = PolicyTrainer(micro_model_cfg(moe_aux_loss_coeff=0.0), _cfg(3), _optim(), run_dir)
    metrics = trainer.train_step(random_groups())
    state = trainer.full_state_dict()
    # numpy copies: tensors would travel back as shared-memory handles that die with the worker process
    return metrics, ({k: v.numpy().copy() for k, v in state.items()} if state is not None else None)


def _cfg(mb):
    return GRPOConfig(
        trainer={"micro_batch_size": mb}, rollout={"sampling": {"max_new_tokens": 9}}, mtp_loss_weight=0.3
    )


def _optim():
    return OptimConfig(lr=1.0, min_lr=0.0, eps=1.0, schedule="constant", weight_decay=0.0, grad_clip=0.0)


def test_data_parallel_ranks_match_one_process(tmp_path):
    """2 data-parallel trainer ranks (DDP over gloo), each training on its share of the rows, make the same update
    as one process on all of them."""
    from tests.distributed import run_distributed

    (m0, state0), (m1, state1) = run_distributed(_dp_step, 2, str(tmp_path / "dp"))
    assert state1 is None
    single = PolicyTrainer(micro_model_cfg(moe_aux_loss_coeff=0.0), _cfg(16), _optim(), str(tmp_path / "one"))
    metrics = single.train_step(random_groups())
    assert m0["tokens"] == m1["tokens"] == metrics["tokens"]
    assert m0["policy_loss"] == pytest.approx(metrics["policy_loss"], rel=1e-5, abs=1e-7)
    reference = single.full_state_dict()
    for name in reference:
        assert torch.allclose(torch.from_numpy(state0[name]), reference[name], atol=1e-6), name


def test_precision_group_reaches_the_trainer(tmp_path):
    """The recipe's precision.param_dtype sets the trainer's compute dtype (fp32 masters, bf16 GEMMs)."""
    torch.manual_seed(0)
    trainer = PolicyTrainer(
        micro_model_cfg(moe_aux_loss_coeff=0.0),
        _cfg(3),
        _optim(),
        str(tmp_path),
        precision_cfg={"param_dtype": "bfloat16"},
    )
    assert trainer.runner.compute_dtype == torch.bfloat16
    seen = set()
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    metrics = trainer.train_step(random_groups())
    assert seen == {torch.bfloat16} and torch.isfinite(torch.tensor(metrics["loss"]))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
