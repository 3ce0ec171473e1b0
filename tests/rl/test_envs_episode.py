"""Token-exact multi-turn episodes through a real rollout worker (engine, environment thread, trainer rows)."""

import asyncio
import time

import pytest
import torch

from latentforge.data.tokenizer import load_tokenizer
from latentforge.model import HybridModel
from latentforge.rl.actors.rollout import RolloutWorker
from latentforge.rl.batch import collate, group_rows
from latentforge.rl.buffer import Group
from latentforge.model.engine import EngineConfig, SamplingParams
from latentforge.rl.config import RolloutConfig
from latentforge.rl.envs import Environment, StepResult
from latentforge.rl.policy import token_logprobs
from tests.rl.helpers import micro_model_cfg

HERE = "tests.rl.test_envs_episode"
TEMPERATURE = 0.9
IM_END_BIAS = 9.0  # makes the random micro model end its turns within a few tokens


class ThreeTurnEnv(Environment):
    """Answers turns 1 and 2 with a tool message, ends at turn 3 with reward 1."""

    async def reset(self, record):
        self.turn = 0
        return [{"role": "user", "content": "count with me"}]

    async def step(self, message):
        self.turn += 1
        if self.turn == 3:
            return StepResult(None, 1.0, True, {"correct": True})
        return StepResult([{"role": "tool", "content": f"obs {self.turn}"}], 0.0, False)


class SlowEnv(ThreeTurnEnv):
    def step(self, message):  # a plain (blocking) method: run in a thread, the engine keeps going
        time.sleep(1.5)
        return StepResult(None, 0.5, True)


class BrokenEnv(ThreeTurnEnv):
    async def step(self, message):
        raise RuntimeError("the environment broke")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = load_tokenizer("bpe")
    cfg = micro_model_cfg(vocab_size=tok.vocab_size)
    model = HybridModel(cfg).eval().requires_grad_(False)
    rollout = RolloutConfig(
        sampling=SamplingParams(max_new_tokens=6, temperature=TEMPERATURE),
        max_turns=5,
        max_episode_tokens=200,
        engine=EngineConfig(max_batch=8),
    )
    worker = RolloutWorker(
        0, cfg, rollout, max_seq_len=256, stop_token_ids=[tok.im_end_id, tok.eod_id], seed=3, tokenizer_spec="bpe"
    )
    for m in (model, worker.engine.model):
        m.lm_head.register_forward_hook(_end_turns(tok.im_end_id))
    worker.stage_weights({k: v.clone() for k, v in model.state_dict().items()}, 0)
    worker.wait_for_version(0)
    spy = _spy_on_engine(worker.engine)
    yield tok, model, worker, spy
    worker.stop()


def _end_turns(im_end_id):
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., im_end_id] += IM_END_BIAS
        return logits

    return hook


def _spy_on_engine(engine):
    results = {}
    step = engine.step

    def recording_step():
        out = step()
        for r in out:
            results[r.request_id] = r
        return out

    engine.step = recording_step
    return results


def _episode(env, group, index, **extra):
    return {
        "group_id": group,
        "sample_index": index,
        "kind": "train",
        "seed": 100 * group + index,
        "min_version": 0,
        "record": {"id": f"r{group}", "env": f"{HERE}:{env}", "enable_thinking": False},
        **extra,
    }


def _collect(worker, n, timeout=120):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, "the rollout worker finished too few episodes"
        out += worker.collect(0.5)
    return out


def test_three_turn_episode_is_token_exact(setup):
    tok, model, worker, spy = setup
    worker.submit([_episode("ThreeTurnEnv", 0, i) for i in range(2)])
    samples = sorted(_collect(worker, 2), key=lambda s: s.sample_index)
    prompt_text = "<|im_start|>user\ncount with me<|im_end|>\n<|im_start|>assistant\n<think></think>"
    for s in samples:
        assert s.meta["turns"] == 3 and s.reward == 1.0 and s.finish_reason == "stop"
        turns = [spy[f"train:0:{s.sample_index}:turn{t}"] for t in range(3)]
        observations = [
            tok.encode_with_control_tokens(
                f"\n<|im_start|>tool\n<tool_response>\nobs {t}\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n<think></think>"
            )
            for t in (1, 2)
        ]
        expected = turns[0].token_ids + observations[0] + turns[1].token_ids + observations[1] + turns[2].token_ids
        expected_mask = (
            [1.0] * len(turns[0].token_ids)
            + [0.0] * len(observations[0])
            + [1.0] * len(turns[1].token_ids)
            + [0.0] * len(observations[1])
            + [1.0] * len(turns[2].token_ids)
        )
        assert all(t.token_ids[-1] == tok.im_end_id for t in turns)
        assert s.prompt_ids == tok.encode_with_control_tokens(prompt_text)
        assert s.completion_ids == expected
        # each later turn was generated from exactly the tokens before it: nothing was re-tokenized
        assert turns[1].prompt_ids == s.prompt_ids + turns[0].token_ids + observations[0]

        row = group_rows([Group(0, samples)], normalize_std=True, filter_overlong=True)[s.sample_index]
        p = len(s.prompt_ids)
        assert row["input_ids"] == (s.prompt_ids + expected)[:-1] and row["targets"] == (s.prompt_ids + expected)[1:]
        assert row["loss_mask"] == [0.0] * (p - 1) + expected_mask
        generated_logprobs = [x for t in turns for x in t.logprobs]
        assert [x for x, m in zip(row["behaviour_logprobs"][p - 1 :], expected_mask) if m] == generated_logprobs
        assert [v for v, m in zip(row["versions"][p - 1 :], expected_mask) if not m] == [-1] * int(
            len(expected_mask) - sum(expected_mask)
        )

        # the trainer's log-probs of the whole episode agree with the engine's at every generated token
        batch = collate([row])
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits
        trainer_logp = token_logprobs(logits, batch["targets"], TEMPERATURE)[0]
        mask = batch["loss_mask"][0] > 0
        assert torch.allclose(trainer_logp[mask], batch["behaviour_logprobs"][0][mask], atol=1e-4)


def test_a_waiting_environment_does_not_stall_other_sequences(setup):
    tok, _, worker, _ = setup
    start = time.monotonic()
    worker.submit([_episode("SlowEnv", 1, 0)])
    worker.submit(
        [
            {
                "group_id": 2,
                "sample_index": 0,
                "kind": "train",
                "seed": 7,
                "min_version": 0,
                "prompt_ids": [tok.bos_id, 5, 6],
            }
        ]
    )
    first = _collect(worker, 1)
    assert first[0].group_id == 2 and time.monotonic() - start < 1.5  # done while the slow environment waited
    slow = _collect(worker, 1)[0]
    assert slow.group_id == 1 and slow.reward == 0.5


def test_a_broken_environment_scores_zero_and_the_worker_goes_on(setup):
    _, _, worker, _ = setup
    worker.submit([_episode("BrokenEnv", 3, 0), _episode("NoSuchEnv", 3, 1)])
    samples = sorted(_collect(worker, 2), key=lambda s: s.sample_index)
    assert [s.reward for s in samples] == [0.0, 0.0]
    assert "the environment broke" in samples[0].reward_info["failures"][0]["message"]
    assert "NoSuchEnv" in samples[1].reward_info["failures"][0]["message"]
    worker.submit([_episode("ThreeTurnEnv", 4, 0)])
    assert _collect(worker, 1)[0].reward == 1.0


def test_turn_and_token_limits_end_episodes(setup):
    tok, _, worker, _ = setup
    limits = worker.episodes.limits
    old = (limits.max_turns, limits.max_episode_tokens)
    try:
        limits.max_turns = 2
        worker.submit([_episode("ThreeTurnEnv", 5, 0)])
        s = _collect(worker, 1)[0]
        assert s.meta["turns"] == 2 and s.reward == 0.0 and s.finish_reason == "stop"
        limits.max_turns, limits.max_episode_tokens = 5, 12
        worker.submit([_episode("ThreeTurnEnv", 6, 0)])
        s = _collect(worker, 1)[0]
        assert s.finish_reason == "length" and len(s.completion_ids) <= 12
    finally:
        limits.max_turns, limits.max_episode_tokens = old


def test_sync_methods_run_off_the_event_loop():
    from latentforge.rl.envs.base import call

    class Plain:
        def step(self, message):
            time.sleep(0.2)
            return message

    async def both():
        start = time.monotonic()
        await asyncio.gather(call(Plain().step, 1), call(Plain().step, 2))
        return time.monotonic() - start

    assert asyncio.run(both()) < 0.35  # the two blocking steps overlapped
