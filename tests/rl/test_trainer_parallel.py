"""The GRPO trainer on the pretraining parallel layouts: one step on 2 gloo processes under TP, PP, FSDP, EP and CP
gives the 1-process PolicyTrainer's loss, statistics and parameters (float32, 1e-5 relative), and
full_state_dict() gathers the sharded / pipeline-split policy into the unsharded model's state dict on rank 0.

Two batches per layout, in the same processes:
- equal-length rows: sequence-level aggregation, KL to the reference, balance loss, expert-bias update;
- rows of random lengths, so padding differs between layouts (per micro-batch, step-wide under PP, a multiple of
  cp x chunk_size under CP): token-level aggregation, balance loss and expert-bias update, in two PPO mini-batches
  (rl.updates_per_batch=2). The batches carry an
  attention_mask, so padding counts nowhere (not in the balance loss, not in the expert loads).
"""

import random

import numpy as np
import pytest
import torch

from latentforge.model import ModelConfig
from latentforge.rl.buffer import Group, Sample
from latentforge.rl.config import GRPOConfig
from latentforge.rl.trainer import PolicyTrainer
from tests.distributed import run_distributed
from tests.rl.helpers import micro_model_cfg
from tests.rl.test_trainer import random_groups
from latentforge.train.config import OptimConfig

MICRO_BATCH = 3  # 12 rows: 4 micro-batches in one process, 2 per data-parallel rank of 2


def model_cfg(aux: bool) -> ModelConfig:
    # two kv heads and two Mamba groups: tensor parallelism splits attention by kv-head groups, Mamba's B/C by group
    return micro_model_cfg(num_key_value_heads=2, mamba_groups=2, moe_aux_loss_coeff=1e-2 if aux else 0.0)


def equal_length_groups(n_groups=3, G=4, vocab=128, seed=1):
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(4, vocab) for _ in range(4)]
        samples = [
            Sample(
                g,
                i,
                prompt,
                [rng.randrange(4, vocab) for _ in range(7)],
                [-rng.uniform(2, 6) for _ in range(7)],
                [rng.choice([0, 0, -1]) for _ in range(7)],
                finish_reason="stop",
                reward=float(i % 2),
            )
            for i in range(G)
        ]
        groups.append(Group(g, samples))
    return groups


def replayed_groups():
    """equal_length_groups whose samples carry recorded routes (random distinct experts per token, one trunk MoE
    layer): rl.router_replay must use exactly these under every layout."""
    gen = torch.Generator().manual_seed(3)
    groups = equal_length_groups(seed=2)
    for group in groups:
        for sample in group.samples:
            n = len(sample.prompt_ids) + len(sample.completion_ids)
            sample.routes = torch.rand(n, 1, 4, generator=gen).argsort(-1)[..., :2]
    return groups


SCENARIOS = {
    # name: (model with balance loss, GRPO config overrides, optimizer overrides, groups)
    "equal": (
        True,
        dict(loss={"aggregation": "sequence", "kl_coef": 0.05}, update_expert_bias=True),
        dict(grad_clip=1.0),
        equal_length_groups,
    ),
    # two PPO mini-batches: a forward-only pi_prox pass, then two optimizer steps clipped against it
    "ragged": (
        True,
        dict(loss={"aggregation": "token"}, update_expert_bias=True, updates_per_batch=2, steps=2),
        dict(grad_clip=0.0),
        random_groups,
    ),
    "replay": (True, dict(loss={"aggregation": "token"}, router_replay=True), dict(grad_clip=0.0), replayed_groups),
}


def _configs(name):
    aux, overrides, optim, groups = SCENARIOS[name]
    cfg = GRPOConfig(
        trainer={"micro_batch_size": MICRO_BATCH},
        rollout={"sampling": {"max_new_tokens": 9}},
        mtp_loss_weight=0.3,
        **overrides,
    )
    # AdamW's first step is lr * g / (|g| + eps): with eps = 1 the update is ~g, so comparing weights compares
    # gradients (with a tiny eps, float noise in near-zero gradients would be amplified to +-lr)
    optim_cfg = OptimConfig(lr=1.0, min_lr=0.0, eps=1.0, schedule="constant", weight_decay=0.1, **optim)
    return model_cfg(aux), cfg, optim_cfg, groups()


def _numpy(state):
    # numpy copies: tensors would travel back as shared-memory handles that die with the worker process
    return None if state is None else {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def run_scenarios(parallel, run_dir, names=tuple(SCENARIOS)):
    torch.set_num_threads(1)
    out = {}
    for name in names:
        mcfg, cfg, optim_cfg, groups = _configs(name)
        trainer = PolicyTrainer(mcfg, cfg, optim_cfg, f"{run_dir}/{name}", parallel)
        initial = _numpy(trainer.full_state_dict())
        metrics = trainer.train_step(groups)
        out[name] = (metrics, initial, _numpy(trainer.full_state_dict()))
        trainer.close()
    return out


def _worker(rank, world_size, layouts, run_dir):
    """Every layout in turn in the same two processes, each trainer built from its own seed (start-up and imports
    are most of a launch's time)."""
    return {name: run_scenarios(parallel, f"{run_dir}/{name}", names) for name, (parallel, names) in layouts.items()}


_REFERENCE = []


def reference(tmp_path_factory):
    if not _REFERENCE:
        _REFERENCE.append(run_scenarios(None, str(tmp_path_factory.mktemp("one"))))
    return _REFERENCE[0]


IGNORED = {"train_s", "train_tokens_per_s"}


def _compare(ranks, want_all):
    for name, got_all in ranks[0].items():
        want, want_initial, want_state = want_all[name]
        got, initial, state = got_all
        for other in ranks[1:]:
            assert other[name][1] is None and other[name][2] is None  # the weights come out on rank 0 only
            assert other[name][0]["loss"] == got["loss"]  # every rank reports the global numbers
        assert sorted(got) == sorted(want), set(got) ^ set(want)
        for key, value in want.items():
            if key not in IGNORED:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (name, key, got[key], value)
        assert sorted(initial) == sorted(want_initial) == sorted(state)
        for key in want_initial:  # the gathered starting policy is the single process's, exactly
            assert np.array_equal(initial[key], want_initial[key]), (name, key)
        for key, value in want_state.items():
            error = np.linalg.norm((state[key] - value).astype(np.float64)) / max(np.linalg.norm(value), 1e-30)
            assert error <= 1e-5, f"{name}: {key} differs by {error:.2e} after the step (relative)"
        assert got["tokens"] > 0 and got["mtp_loss_sum"] > 0
        assert got["aux_loss_sum"] > 0
        if name == "equal":
            assert got["kl_sum"] >= 0
        elif name == "ragged":
            assert got["optimizer_steps"] == 2 and got["ppo_clipped"] > 0


LAYOUTS = {
    # name: (parallel config, scenarios)
    "tp2": (dict(tp=2), ("equal", "ragged")),
    "pp2": (dict(pp=2), ("equal", "ragged")),
    "fsdp2": (dict(dp_shard=2), ("equal", "ragged")),
    "ep2": (dict(ep=2), tuple(SCENARIOS)),  # with rollout routing replay
    "cp2": (dict(cp=2), ("equal", "ragged")),  # rows padded to a multiple of cp x chunk_size (32 here)
}


def test_grpo_step_on_each_parallel_layout_matches_one_process(tmp_path, tmp_path_factory):
    ranks = run_distributed(_worker, 2, LAYOUTS, str(tmp_path), timeout=900)
    want = reference(tmp_path_factory)
    for name in LAYOUTS:
        try:
            _compare([rank[name] for rank in ranks], want)
        except AssertionError as error:
            raise AssertionError(f"layout {name}: {error}") from error


def test_micro_batches_fit_the_pipeline():
    """Under PP the rows of a rank are spread over at least pp micro-batches of one shape."""
    from latentforge.rl.batch import collate, group_rows, padded_length, shard_micro_batches

    rows = group_rows(random_groups(), normalize_std=True, filter_overlong=False)
    micro = shard_micro_batches(rows[:3], 0, 1, 8, min_micro_batches=2, multiple_of=2)
    assert [len(m) for m in micro] == [2, 1]
    length = padded_length(rows[:3], 4)
    assert length % 4 == 0
    shapes = {tuple(collate(m, length=length, num_rows=2)["input_ids"].shape) for m in micro}
    assert shapes == {(2, length)}
    padded = collate(micro[1], length=length, num_rows=2)
    assert padded["loss_mask"][1].sum() == 0 and padded["row_version"][1, 0] == -1
    with pytest.raises(ValueError, match="shorter than the longest row"):
        collate(micro[0], length=1)
