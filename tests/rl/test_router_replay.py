"""Rollout routing replay (R3) on the model forward: a trainer whose router would choose other experts than the
rollout's reproduces the rollout's log-probs exactly when it replays the recorded routes, and its router still
gets a gradient."""

import copy

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.model.moe import router_agreement
from tests.rl.helpers import micro_model_cfg


def _models():
    torch.manual_seed(0)
    rollout = HybridModel(micro_model_cfg(pattern="ME*E")).eval()
    with torch.no_grad():  # a fresh init's experts barely move the output: make the routing matter
        for moe in rollout.moe_layers():
            moe.experts.up_proj.normal_(std=0.5)
            moe.experts.down_proj.normal_(std=0.5)
        rollout.lm_head.weight.mul_(20.0)
    trainer = copy.deepcopy(rollout)
    # the expert bias only chooses experts (gate weights use the unbiased scores): shifting it changes the routing
    # and nothing else, so with the rollout's routes the trainer must give the rollout's numbers exactly
    for moe in trainer.moe_layers():
        moe.gate.e_score_correction_bias.add_(torch.randn_like(moe.gate.e_score_correction_bias) * 0.5)
    return rollout, trainer


def _logprobs(model, ids, routes=None):
    """(log-probs of ids[:, 1:], the routes the forward used)."""
    out = model(ids, routes=routes)
    logp = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, out.routes


def test_replayed_routes_reproduce_the_rollout_logprobs():
    rollout, trainer = _models()
    ids = torch.randint(4, 128, (3, 12))
    with torch.no_grad():
        want, routes = _logprobs(rollout, ids)
        free, own = _logprobs(trainer, ids)
    assert routes.shape == (3, 12, 2, 2)
    assert router_agreement(routes, own) < 0.9  # the perturbation does change the routing
    assert (free - want).abs().max() > 1e-3
    got, replayed = _logprobs(trainer, ids, routes)
    assert torch.equal(replayed, routes)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    got.sum().backward()
    trunk_moe = trainer.moe_layers()[: len(trainer.trunk_moe_index)]  # the MTP block's router is not in this loss
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in trunk_moe)


def test_replay_rejects_routes_of_another_shape():
    rollout, _ = _models()
    ids = torch.randint(4, 128, (2, 8))
    with pytest.raises(ValueError, match="MoE layers"):
        rollout(ids, routes=torch.zeros(2, 8, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="replayed routes have shape"):
        rollout(ids, routes=torch.zeros(2, 7, 2, 2, dtype=torch.long))


def test_router_agreement_compares_sets():
    a = torch.tensor([[[0, 1]], [[2, 3]]])
    b = torch.tensor([[[1, 0]], [[2, 1]]])
    assert router_agreement(a, b) == 0.5


def _trainer_and_rollout(tmp_path, replay: bool):
    from latentforge.rl.config import GRPOConfig
    from latentforge.rl.trainer import PolicyTrainer
    from latentforge.train.config import OptimConfig

    cfg = GRPOConfig(
        trainer={"micro_batch_size": 4},
        rollout={"sampling": {"max_new_tokens": 9}},
        mtp_loss_weight=0.0,
        router_replay=replay,
    )
    trainer = PolicyTrainer(
        micro_model_cfg(pattern="ME*E", moe_aux_loss_coeff=0.0),
        cfg,
        OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0),
        str(tmp_path),
    )
    with torch.no_grad():
        for moe in trainer.model.moe_layers():
            moe.experts.up_proj.normal_(std=0.5)
            moe.experts.down_proj.normal_(std=0.5)
        trainer.model.lm_head.weight.mul_(20.0)
    rollout = copy.deepcopy(trainer.model).eval()
    for moe in trainer.model.moe_layers():
        moe.gate.e_score_correction_bias.add_(torch.randn_like(moe.gate.e_score_correction_bias) * 0.5)
    return trainer, rollout


def _rollout_groups(rollout, n_groups=2, G=2, seed=0):
    from latentforge.rl.buffer import Group, Sample

    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = torch.randint(4, 128, (5,), generator=gen).tolist()
        samples = []
        for i in range(G):
            completion = torch.randint(4, 128, (7,), generator=gen).tolist()
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp, routes = _logprobs(rollout, ids)
            samples.append(
                Sample(
                    g,
                    i,
                    prompt,
                    completion,
                    logp[0, len(prompt) - 1 :].tolist(),
                    [0] * 7,
                    reward=float(i % 2),
                    routes=routes[0],
                )
            )
        groups.append(Group(g, samples))
    return groups


@pytest.mark.parametrize("replay", [True, False])
def test_grpo_trainer_replays_the_rollout_routes(tmp_path, replay):
    """rl.router_replay: the trainer's fp32 log-probs equal the rollout's (the logged engine-vs-trainer
    mismatch is ~0); without it the perturbed router's choices show in the mismatch."""
    torch.set_num_threads(1)
    trainer, rollout = _trainer_and_rollout(tmp_path, replay)
    groups = _rollout_groups(rollout)
    agree = 0.0  # independently: the trainer's own routes on each sample's input tokens vs the recorded ones
    for sample in (s for g in groups for s in g.samples):
        ids = torch.tensor([sample.prompt_ids + sample.completion_ids])[:, :-1]
        with torch.no_grad():
            own = trainer.model(ids).routes
        agree += router_agreement(own[0], sample.routes[:-1]) * ids.shape[1] * 2
    metrics = trainer.train_step(groups)
    mismatch = metrics["abs_log_mismatch_sum"] / metrics["tokens"]
    assert (mismatch < 1e-5) if replay else (mismatch > 1e-3), mismatch
    # the trainer's own router disagrees with the recorded routes either way (its bias was shifted)
    assert metrics["router_pairs"] == 2 * 2 * 11 * 2  # sequences x positions x trunk MoE layers
    assert 0 < metrics["router_agree_sum"] < metrics["router_pairs"]
    assert metrics["router_agree_sum"] == pytest.approx(agree)
