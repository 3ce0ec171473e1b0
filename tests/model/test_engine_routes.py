"""Rollout routing replay (R3) from the engine: the routes it records (prefill, decode, MTP verify steps, weight
updates under "recompute") are the ones a plain forward of the model over prompt + completion chooses, and a trainer
whose router is perturbed reproduces the engine's log-probs when it replays them."""

import copy

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from tests.rl.helpers import micro_model_cfg
from tests.model.test_engine import OracleDrafts, reference_greedy

PROMPTS = [[5, 9, 17, 3], [7, 7, 40, 2, 11, 90, 33], [5, 9, 17, 3], [100]]


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = HybridModel(micro_model_cfg(pattern="ME*E")).eval()
    with torch.no_grad():  # make the routing matter (test_router_replay.py does the same)
        for moe in model.moe_layers():
            moe.experts.up_proj.normal_(std=0.5)
            moe.experts.down_proj.normal_(std=0.5)
        model.lm_head.weight.mul_(20.0)
    return model.to(dtype)


def _reference_routes(model, tokens: list) -> torch.Tensor:
    """The independent reference: the routes of one plain forward over the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).routes[0]


def _with_oracle_drafts(engine, model, max_new: int):
    """A random MTP block drafts nothing acceptable: drafts from the true greedy continuation, partly corrupted,
    so verify steps accept 0..k drafts and reject the rest."""
    if engine.drafter is not None:
        OracleDrafts(engine, {tuple(p): reference_greedy(model, p, max_new) for p in PROMPTS})
    return engine


def _check_routes(model, results):
    for result in results:
        tokens = result.prompt_ids + result.token_ids
        assert result.routes.dtype == torch.long
        assert result.routes.shape == (len(tokens) - 1, 2, 2)  # the last token is never fed
        assert torch.equal(result.routes, _reference_routes(model, tokens)[:-1])


def test_routes_are_off_by_default():
    engine = Engine(_model(), EngineConfig(max_batch=2, max_seq_len=32))
    result = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert result.routes is None


def test_recorded_routes_equal_a_full_forward():
    model = _model()
    params = SamplingParams(temperature=0, max_new_tokens=9)
    for draft_tokens in (0, 2, 3):
        engine = _with_oracle_drafts(
            Engine(model, EngineConfig(max_batch=2, max_seq_len=32, record_routes=True, draft_tokens=draft_tokens)),
            model,
            9,
        )
        results = engine.generate(PROMPTS, params)  # 4 prompts on 2 slots: joins, compaction, a prefix-cache hit
        _check_routes(model, results)
        if draft_tokens:
            assert sum(engine.stats.accepted) > 0 and sum(engine.stats.accepted) < sum(engine.stats.drafted)
        assert engine.stats.prefix_hits > 0


def test_routes_are_recomputed_with_the_weights():
    model = _model()
    new_model = _model()
    with torch.no_grad():
        for moe in new_model.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.randn_like(moe.gate.e_score_correction_bias))
    for draft_tokens in (0, 2):
        engine = Engine(
            copy.deepcopy(model),
            EngineConfig(
                max_batch=4,
                max_seq_len=32,
                draft_tokens=draft_tokens,
                weight_update_policy="recompute",
                record_routes=True,
            ),
        )
        for prompt in PROMPTS[:2]:
            engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=10))
        for _ in range(3):
            assert not engine.step()
        engine.update_weights(new_model.state_dict(), version=1)
        results = []
        while engine.has_unfinished():
            results += engine.step()
        _check_routes(new_model, results)


def test_replaying_engine_routes_reproduces_engine_logprobs():
    rollout = _model(torch.float32)
    trainer = copy.deepcopy(rollout)
    with torch.no_grad():  # shifting the bias changes the routing and nothing else
        for moe in trainer.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.randn_like(moe.gate.e_score_correction_bias) * 0.5)
    for draft_tokens in (0, 2):
        engine = _with_oracle_drafts(
            Engine(rollout, EngineConfig(max_batch=2, max_seq_len=32, record_routes=True, draft_tokens=draft_tokens)),
            rollout,
            9,
        )
        results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=9))
        free_gap = 0.0
        for result in results:
            tokens = result.prompt_ids + result.token_ids
            ids = torch.tensor([tokens[:-1]])
            targets = torch.tensor(result.token_ids)
            want = torch.tensor(result.logprobs, dtype=torch.float32)
            with torch.no_grad():
                free = torch.log_softmax(trainer(ids).logits.float()[0, len(result.prompt_ids) - 1 :], -1)
                replayed = trainer(ids, routes=result.routes[None]).logits.float()[0, len(result.prompt_ids) - 1 :]
                replayed = torch.log_softmax(replayed, -1)
            free_gap = max(free_gap, float((free.gather(-1, targets[:, None])[:, 0] - want).abs().max()))
            got = replayed.gather(-1, targets[:, None])[:, 0]
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (draft_tokens, (got - want).abs().max())
        assert free_gap > 1e-3  # without the replay the perturbed router does not give the engine's numbers


def test_rollout_worker_samples_carry_routes_the_trainer_replays(tmp_path):
    """Rollout worker (record_routes, MTP drafting, sampling) -> Sample.routes -> collate -> trainer replay: with its
    router perturbed, the trainer's fp32 log-probs still equal the engine's (the GRPO step's mismatch)."""
    from latentforge.rl.actors.rollout import RolloutWorker
    from latentforge.rl.buffer import Group
    from latentforge.rl.config import GRPOConfig
    from latentforge.rl.trainer import PolicyTrainer
    from latentforge.train.config import OptimConfig
    from tests.rl.test_rollout_sync import generate

    torch.set_num_threads(1)
    model_cfg = micro_model_cfg(pattern="ME*E")
    cfg = GRPOConfig(
        rollout={
            "group_size": 3,
            "sampling": {"max_new_tokens": 12, "temperature": 0.8},
            "engine": {"draft_tokens": 2},
        },
        trainer={"micro_batch_size": 6},
        filter_overlong=False,
        router_replay=True,
    )
    trainer = PolicyTrainer(model_cfg, cfg, OptimConfig(lr=1e-3, schedule="constant"), str(tmp_path))
    with torch.no_grad():
        for moe in trainer.model.moe_layers():
            moe.experts.up_proj.normal_(std=0.5)
            moe.experts.down_proj.normal_(std=0.5)
    worker = RolloutWorker(0, model_cfg, cfg.rollout, max_seq_len=48, stop_token_ids=[], seed=5, record_routes=True)
    try:
        worker.stage_weights(trainer.full_state_dict(), 0)
        worker.wait_for_version(0)
        samples = generate(worker, groups=2, samples_per_group=3)
    finally:
        worker.stop()
    for sample in samples:
        tokens = sample.prompt_ids + sample.completion_ids
        assert sample.routes.shape == (len(tokens) - 1, 2, 2)
    with torch.no_grad():
        for moe in trainer.model.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.randn_like(moe.gate.e_score_correction_bias) * 0.5)
    for i, sample in enumerate(samples):
        sample.reward = float(i % 2)
    metrics = trainer.train_step([Group(g, [s for s in samples if s.group_id == g]) for g in range(2)])
    # the trainer's own router would choose other experts for many token-layer pairs
    assert metrics["router_agree_sum"] < 0.95 * metrics["router_pairs"]
    assert metrics["mismatch_fresh_max"] < 1e-5, metrics["mismatch_fresh_max"]


def test_multi_turn_episode_routes_cover_every_consumed_token():
    """An episode's Sample.routes join its turns' routes (each turn's prefill reads the observation): they equal a
    plain forward over the whole episode."""
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.rl.actors.rollout import RolloutWorker
    from latentforge.rl.config import RolloutConfig
    from tests.rl.test_envs_episode import _collect, _end_turns, _episode

    torch.manual_seed(0)
    tok = load_tokenizer("bpe")
    cfg = micro_model_cfg(vocab_size=tok.vocab_size, pattern="ME*E")
    rollout = RolloutConfig(
        sampling=SamplingParams(max_new_tokens=6, temperature=0.8),
        max_turns=3,
        max_episode_tokens=200,
        engine=EngineConfig(draft_tokens=2, max_batch=4),
    )
    worker = RolloutWorker(
        0,
        cfg,
        rollout,
        max_seq_len=256,
        stop_token_ids=[tok.im_end_id, tok.eod_id],
        seed=3,
        tokenizer_spec="bpe",
        record_routes=True,
    )
    try:
        model = worker.engine.model
        model.lm_head.register_forward_hook(_end_turns(tok.im_end_id))  # turns end, the environment answers
        worker.stage_weights({k: v.clone() for k, v in model.state_dict().items()}, 0)
        worker.wait_for_version(0)
        worker.submit([_episode("ThreeTurnEnv", 0, i) for i in range(2)])
        samples = _collect(worker, 2)
    finally:
        worker.stop()
    for sample in samples:
        assert sample.meta["turns"] == 3
        tokens = sample.prompt_ids + sample.completion_ids
        assert torch.equal(sample.routes, _reference_routes(model, tokens)[:-1])


def test_a_sample_without_input_tokens_needs_no_routes():
    """An episode whose environment reset failed is a [BOS] prompt without completion: nothing to replay."""
    from latentforge.rl.batch import collate, group_rows
    from latentforge.rl.buffer import Group, Sample

    routed = Sample(
        group_id=0,
        sample_index=0,
        prompt_ids=[1, 5],
        completion_ids=[7, 9],
        logprobs=[-1.0, -2.0],
        versions=[0, 0],
        routes=torch.ones(3, 2, 2, dtype=torch.long),
        reward=1.0,
    )
    failed = Sample(group_id=0, sample_index=1, prompt_ids=[1], completion_ids=[], logprobs=[], versions=[], reward=0.0)
    batch = collate(group_rows([Group(0, [routed, failed])], normalize_std=True, filter_overlong=True))
    assert torch.equal(batch["routes"][0, :3], routed.routes)
    unrouted = Sample(
        group_id=0, sample_index=1, prompt_ids=[1, 4], completion_ids=[6], logprobs=[-1.0], versions=[0], reward=0.0
    )
    with pytest.raises(ValueError, match="no recorded routes"):
        collate(group_rows([Group(0, [routed, unrouted])], normalize_std=True, filter_overlong=True))


def test_results_enter_autograd():
    """The engine steps under inference mode; the routes and logits it hands out still train (route replay in a
    backward, a distillation loss on the logits)."""
    model = _model(torch.float32)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=32, record_routes=True, draft_tokens=2))
    result = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=5, return_logits=True))[0]
    trainer = copy.deepcopy(model).train()
    ids = torch.tensor([result.prompt_ids + result.token_ids[:-1]])
    logits = trainer(ids, routes=result.routes[None]).logits[0, len(result.prompt_ids) - 1 :]
    loss = torch.nn.functional.mse_loss(logits, result.logits)
    loss.backward()
    assert trainer.lm_head.weight.grad is not None and trainer.lm_head.weight.grad.abs().sum() > 0
    assert not result.routes.is_inference() and not result.logits.is_inference()
