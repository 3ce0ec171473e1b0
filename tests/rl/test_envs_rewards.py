"""User reward functions and the model judge on environment episodes: a python_tool episode played through the
episode runner (scripted turns, real sandbox) is scored by the reward worker with the environment's reward in the
task verifier's place, user functions (inline and sandboxed) reading the whole episode, and a judge grading its
final answer."""

import copy
import json
import queue
from types import SimpleNamespace

import pytest
import torch

from latentforge.data.tokenizer import load_tokenizer
from latentforge.model import HybridModel
from latentforge.model.hf import save_pretrained
from latentforge.rl.actors.reward import RewardWorker
from latentforge.rl.config import RewardConfig
from latentforge.rl.envs.episode import EpisodeLimits, EpisodeRunner
from latentforge.rl.rewards import get_task
from latentforge.rl.rewards.judge import JudgeConfig, ModelJudge
from tests.rl.helpers import micro_model_cfg

HERE = "tests.rl.test_envs_rewards"
RUBRIC = "{question}\n{response}\nScore?"  # short prompts: the micro judge learns its verdicts fast


def tool_calls_seen(record, completion):
    """A user reward that needs the whole episode: how many tool calls and answers its text holds."""
    return completion.count("<tool_call>") + 10 * completion.count("Answer:")


def echo_length(record, completion):
    return float(len(completion))


def always_raises(record, completion):
    raise RuntimeError("user reward bug")


def call_text(code):
    return "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"


def play_episode(tok, record, turns):
    """Drive a real EpisodeRunner: each scripted assistant turn is handed over as the engine's result of the turn
    request the runner queued; returns the delivered Sample."""
    requests, delivered = queue.Queue(), queue.Queue()
    runner = EpisodeRunner(
        tok, EpisodeLimits(max_turns=4, max_episode_tokens=400, step_timeout_s=30), requests.put, delivered.put
    )
    try:
        runner.start({"group_id": 0, "sample_index": 0, "kind": "train", "seed": None, "record": record})
        for text in turns:
            request = requests.get(timeout=30)
            ids = tok.encode_chat_text(text) + [tok.im_end_id]
            runner.on_generated(
                SimpleNamespace(
                    request_id=request["rid"],
                    token_ids=ids,
                    logprobs=[-0.5] * len(ids),
                    versions=[0] * len(ids),
                    routes=None,
                    finish_reason="stop",
                )
            )
        return delivered.get(timeout=30)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def episode():
    tok = load_tokenizer("bpe")
    record = dict(get_task("python_tool").prompts("test", 1, 0)[0], enable_thinking=False, env_options={"timeout_s": 5})
    sample = play_episode(tok, record, [call_text(f"print({record['answer']})"), f"Answer: {record['answer']}"])
    assert sample.reward == 1.0 and sample.reward_info["tool_calls"] == 1 and sample.meta["turns"] == 2
    return tok, record, sample


def fresh(sample):
    """A copy of the delivered sample, as the reward worker receives it from the rollout worker."""
    return copy.deepcopy(sample)


def transcript(tok, sample):
    text = tok.decode(sample.completion_ids)
    return text.removesuffix("<|im_end|>")


def test_user_functions_read_the_whole_episode_and_add_to_the_environment_reward(episode):
    tok, record, delivered = episode
    cfg = RewardConfig(
        task_weight=0.5,
        functions=[
            {"target": f"{HERE}:tool_calls_seen", "weight": 0.1, "isolation": "inline"},
            {"target": f"{HERE}:echo_length", "weight": 0.001},  # in the sandboxed child process
        ],
    )
    worker = RewardWorker(cfg, "bpe")
    try:
        sample = fresh(delivered)
        worker.score([sample], [record])
    finally:
        worker.close()
    text = transcript(tok, delivered)
    assert (
        text.count("<tool_call>") == 1 and "<|im_start|>tool\n" in text and text.endswith(f"Answer: {record['answer']}")
    )
    assert sample.text == text
    assert sample.reward_info["components"] == pytest.approx(
        {"env": 1.0, "tool_calls_seen": 11.0, "echo_length": float(len(text))}
    )
    assert sample.reward == pytest.approx(0.5 * 1.0 + 0.1 * 11.0 + 0.001 * len(text))
    # the environment's own counters and verdict survive scoring
    assert sample.reward_info["correct"] is True and sample.reward_info["tool_calls"] == 1
    assert sample.reward_info["tool_errors"] == 0 and "failures" not in sample.reward_info


def test_a_failing_user_function_keeps_the_environment_reward_and_its_failures(episode):
    _, record, delivered = episode
    worker = RewardWorker(RewardConfig(functions=[{"target": f"{HERE}:always_raises", "isolation": "inline"}]), "bpe")
    try:
        sample = fresh(delivered)
        sample.reward_info["failures"] = [{"function": "env:python_tool.step", "status": "error", "message": "x"}]
        worker.score([sample], [record])
    finally:
        worker.close()
    assert sample.reward == 1.0
    failures = sample.reward_info["failures"]
    assert [f["function"] for f in failures] == ["env:python_tool.step", "always_raises"]
    assert "user reward bug" in failures[1]["message"] and worker.scorer.failures == 1


def test_judge_only_reward_for_episodes(episode, tmp_path):
    """task_weight 0: the judge alone scores each episode (a micro judge taught to say 'Score: 7'), and what it
    grades is the episode's final answer (the last turn, after the tool call and its reply)."""
    tok, record, right = episode
    wrong = play_episode(tok, record, [call_text(f"print({record['answer']})"), f"Answer: {record['answer'] + 1}"])
    judge_dir = _teach_judge(tok, record, {f"Answer: {record['answer']}": "Score: 7"}, tmp_path)
    cfg = RewardConfig(
        task_weight=0.0,
        judge={
            "checkpoint": judge_dir,
            "tokenizer": "bpe",
            "weight": 2.0,
            "sampling": {"max_new_tokens": 8},
            "rubric": RUBRIC,
        },
    )
    worker = RewardWorker(cfg, "bpe")
    try:
        samples = [fresh(right), fresh(wrong)]
        worker.score(samples, [record, record])
        graded = [worker.judge.prompt_ids(record, s.text) for s in samples]
        finals = [worker.judge.prompt_ids(record, f"Answer: {record['answer'] + k}") for k in (0, 1)]
    finally:
        worker.close()
    assert graded == finals
    assert [s.reward_info["components"] for s in samples] == [{"env": 1.0, "judge": 0.7}, {"env": 0.0, "judge": 0.7}]
    assert [s.reward for s in samples] == pytest.approx([2.0 * 0.7, 2.0 * 0.7])
    assert samples[0].reward_info["judge_score"] == 7.0 and samples[1].reward_info["tool_calls"] == 1


def _teach_judge(tok, record, verdicts, tmp_path):
    torch.manual_seed(0)
    model = HybridModel(micro_model_cfg(tok.vocab_size))
    judge = ModelJudge(JudgeConfig(checkpoint="unused", rubric=RUBRIC), model=model.eval(), tokenizer=tok)
    rows = []
    for response, verdict in verdicts.items():
        target = tok.encode_chat_text(verdict) + [tok.im_end_id]
        rows.append((judge.prompt_ids(record, response) + target, len(target)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = 0.0
        for row, n in rows:
            ids = torch.tensor([row])
            logits = model(ids[:, :-1]).logits[0, -n:]
            loss = loss + torch.nn.functional.cross_entropy(logits, ids[0, -n:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_pretrained(model.eval(), tmp_path / "judge")
    return str(tmp_path / "judge")
