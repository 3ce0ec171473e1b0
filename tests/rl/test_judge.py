"""The model judge: verdicts parsed from a real engine run of a checkpoint (a micro model taught to answer
'Score: 7'), failures (no score, timeout, too long) scored 0 and reported, the reward worker adding its score."""

import pytest
import torch

from latentforge.data.tokenizer import load_tokenizer
from latentforge.model import HybridModel
from latentforge.model.hf import save_pretrained
from latentforge.rl.actors.reward import RewardWorker
from latentforge.rl.buffer import Sample
from latentforge.rl.config import GRPOConfigError, RewardConfig
from latentforge.model.engine import EngineConfig, SamplingParams
from latentforge.model.errors import UserError
from latentforge.rl.grpo import load_configs
from latentforge.rl.rewards.judge import JudgeConfig, ModelJudge, judge_engine, judge_sampling, parse_score
from tests.rl.helpers import micro_model_cfg

RECORDS = [
    {
        "task": "arithmetic",
        "answer": 12,
        "enable_thinking": False,
        "messages": [{"role": "user", "content": "What is 3 * 4?"}],
    },
    {
        "task": "arithmetic",
        "answer": 5,
        "enable_thinking": False,
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
    },
]
COMPLETIONS = ["Answer: 12", "Answer: 6"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A micro model trained to reply 'Score: 7' to the rubric prompts, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    tok = load_tokenizer("bpe")
    model = HybridModel(micro_model_cfg(tok.vocab_size))
    judge = ModelJudge(JudgeConfig(checkpoint="unused"), model=model.eval(), tokenizer=tok)
    target = tok.encode_chat_text("Score: 7") + [tok.im_end_id]
    rows = [judge.prompt_ids(r, c) + target for r, c in zip(RECORDS, COMPLETIONS)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        loss = 0.0
        for row in rows:
            ids = torch.tensor([row])
            logits = model(ids[:, :-1]).logits[0, -len(target) :]
            loss = loss + torch.nn.functional.cross_entropy(logits, ids[0, -len(target) :])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("judge") / "hf"
    save_pretrained(model.eval(), path)
    return str(path)


def test_parse_score():
    assert parse_score("Fine work. Score: 7", 10) == 7.0
    assert parse_score("score=3.5 then Score: 8", 10) == 8.0
    assert parse_score("<think>Score: 1</think>no number", 10) is None
    assert parse_score("Score: 11", 10) is None and parse_score("Score: -1", 10) is None


def _judge(judge_dir, **fields) -> ModelJudge:
    """A judge of the checkpoint with 8-token greedy verdicts, configured as a recipe's rl.reward.judge is."""
    judge = {"checkpoint": judge_dir, "tokenizer": "bpe", "sampling": {"max_new_tokens": 8}, **fields}
    return ModelJudge(RewardConfig(judge=judge).judge)


def test_judge_checkpoint_verdicts_and_failures(judge_dir):
    judge = _judge(judge_dir)
    results = judge.judge(list(zip(RECORDS, COMPLETIONS)))
    assert [r.score for r in results] == [0.7, 0.7] and results[0].info["judge_score"] == 7.0
    strict = _judge(judge_dir, max_score=5)
    failed = strict.judge([(RECORDS[0], COMPLETIONS[0])])[0]  # 7 is outside [0, 5]
    assert failed.score == 0.0 and failed.info["failures"][0]["status"] == "unparsable"
    short = _judge(judge_dir, engine={"max_seq_len": 40})
    assert short.judge([(RECORDS[0], COMPLETIONS[0])])[0].info["failures"][0]["status"] == "too_long"
    slow = _judge(judge_dir, timeout_s=1e-9)
    timed_out = slow.judge(list(zip(RECORDS, COMPLETIONS)))
    assert all(r.score == 0.0 and r.info["failures"][0]["status"] == "timeout" for r in timed_out)


def test_reward_worker_adds_the_judge_score(judge_dir):
    cfg = RewardConfig(
        task_weight=1.0,
        judge={"checkpoint": judge_dir, "tokenizer": "bpe", "weight": 0.5, "sampling": {"max_new_tokens": 8}},
    )
    worker = RewardWorker(cfg, "bpe")
    tok = worker.tokenizer
    samples = [
        Sample(0, i, [1], ids, [0.0] * len(ids), [0] * len(ids))
        for i, ids in enumerate(tok.encode_chat_text(c) + [tok.im_end_id] for c in COMPLETIONS)
    ]
    worker.score(samples, RECORDS)
    assert [s.reward for s in samples] == pytest.approx([1.0 + 0.35, 0.35])
    assert samples[0].reward_info["components"] == {"task": 1.0, "judge": 0.7}
    worker.close()


def test_judge_config_errors_name_the_field():
    with pytest.raises(GRPOConfigError, match="rl.reward.judge: rl.reward.judge.checkpoint is required"):
        RewardConfig(judge={"weight": 1.0})
    with pytest.raises(GRPOConfigError, match="must contain {response}"):
        RewardConfig(judge={"checkpoint": "x", "rubric": "{question}"})


def test_a_given_model_without_its_tokenizer_is_refused_at_construction():
    """Found by pyright: the judge used to accept model= alone and fail on its first rubric prompt (None has no
    apply_chat_template)."""
    model = HybridModel(micro_model_cfg(load_tokenizer("bpe").vocab_size)).eval()
    with pytest.raises(ValueError, match="needs that model's tokenizer"):
        ModelJudge(JudgeConfig(checkpoint="unused"), model=model)


def test_judge_nests_the_engine_and_sampling_configs_with_its_own_defaults():
    from dataclasses import fields

    restated = {f.name for f in fields(JudgeConfig)} & (
        {f.name for f in fields(EngineConfig)} | {f.name for f in fields(SamplingParams)}
    )
    assert not restated, f"JudgeConfig restates engine / sampling fields: {restated}"
    plain = JudgeConfig(checkpoint="x")
    assert (plain.sampling.temperature, plain.sampling.max_new_tokens, plain.engine.max_batch) == (0.0, 64, 16)
    assert plain.engine == EngineConfig(max_batch=16) and plain.sampling == judge_sampling()
    # a partial mapping keeps the judge's other defaults (greedy, batch 16), not the classes' (temperature 1, 8)
    judge = RewardConfig(judge={"checkpoint": "x", "sampling": {"max_new_tokens": 8}, "engine": {"draft_tokens": 2}})
    assert judge.judge is not None
    assert judge.judge.sampling == SamplingParams(temperature=0.0, max_new_tokens=8)
    assert judge.judge.engine == EngineConfig(max_batch=16, draft_tokens=2) and judge_engine().draft_tokens == 0


def test_flat_judge_keys_name_their_new_place():
    for key, new in (("max_new_tokens", "sampling"), ("temperature", "sampling"), ("max_batch", "engine")):
        with pytest.raises(GRPOConfigError, match=rf"rl\.reward\.judge\.{key} is now rl\.reward\.judge\.{new}\.{key}"):
            RewardConfig(judge={"checkpoint": "x", key: 1})
    with pytest.raises(
        UserError, match=r"rl\.reward\.judge\.max_seq_len is now rl\.reward\.judge\.engine\.max_seq_len"
    ):
        load_configs(["recipe=grpo_tiny", "+rl.reward.judge.max_seq_len=4096"])
    with pytest.raises(GRPOConfigError, match=r"rl\.reward\.judge\.sampling\.max_new_tokens must be an integer"):
        RewardConfig(judge={"checkpoint": "x", "sampling": {"max_new_tokens": "many"}})
