"""The environment interface and the built-in environments: registry, tool-call errors as observations, the
sandboxed python tool (output, crash, hang), guess-the-number's reward growing with informative turns, tasks as
one-step environments."""

import asyncio

import pytest

from latentforge.rl.envs import EnvSpecError, env_class, make_env
from latentforge.rl.envs.episode import assistant_message
from latentforge.rl.rewards import get_task


def run(coro):
    return asyncio.run(coro)


def turn(text, thinking=False):
    return assistant_message(text, thinking)


def call(name, **arguments):
    import json

    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_registry_by_name_and_module_path():
    assert env_class("python_tool").name == "python_tool"
    assert env_class("tests.rl.test_envs_episode:ThreeTurnEnv").__name__ == "ThreeTurnEnv"
    with pytest.raises(EnvSpecError, match="unknown environment 'nope'.*registered"):
        env_class("nope")
    with pytest.raises(EnvSpecError, match="could not be loaded"):
        env_class("tests.rl.test_envs:Missing")


def test_assistant_message_parses_reasoning_answer_and_calls():
    m = turn("let me compute</think>\nSure." + call("python", code="print(1)"), thinking=True)
    assert m["reasoning_content"] == "let me compute" and m["content"].startswith("Sure.")
    assert m["tool_calls"] == [{"name": "python", "arguments": {"code": "print(1)"}}] and not m["tool_call_errors"]
    # a call inside unfinished reasoning is not a call
    assert turn(call("python", code="1"), thinking=True)["tool_calls"] == []


def python_env(record, **options):
    env = make_env(dict(record, env_options=options))
    run(env.reset(record))
    return env


@pytest.fixture(scope="module")
def word_problem():
    record = get_task("python_tool").prompts("test", 1, 0)[0]
    record["enable_thinking"] = False
    return record


def test_python_tool_runs_code_in_the_sandbox(word_problem):
    env = python_env(word_problem, timeout_s=2)
    result = run(env.step(turn(call("python", code="print(6 * 7)"))))
    assert result.observations == [{"role": "tool", "content": "42"}] and not result.done and result.reward == 0
    final = run(env.step(turn(f"Answer: {word_problem['answer']}")))
    assert final.done and final.reward == 1.0 and final.info["correct"]
    assert final.info["tool_calls"] == 1 and final.info["tool_errors"] == 0
    wrong = python_env(word_problem)
    assert run(wrong.step(turn(f"Answer: {word_problem['answer'] + 1}"))).reward == 0.0


def test_python_tool_partial_credit_for_a_close_wrong_answer(word_problem):
    truth = word_problem["answer"]
    off = max(abs(truth) // 4, 1)
    record = dict(word_problem, partial_credit=0.5)
    close = run(python_env(record).step(turn(f"Answer: {truth + off}")))
    assert close.reward == pytest.approx(0.5 * (1 - off / max(abs(truth), 1))) and close.info["correct"] is False
    assert run(python_env(record).step(turn(f"Answer: {truth}"))).reward == 1.0
    assert run(python_env(record).step(turn("no number"))).reward == 0.0


def test_answer_uses_tool_output_reads_the_last_tool_reply(word_problem):
    from latentforge.data.chat import render_observation
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.rl.envs.python_tool import answer_uses_tool_output

    tok = load_tokenizer("bpe")

    def episode(*replies, answer):
        text = ""
        for reply in replies:
            text += call("python", code="print(1)") + "<|im_end|>"
            text += tok.decode(render_observation(tok, [{"role": "tool", "content": reply}], enable_thinking=False))
        return text + f"Answer: {answer}"

    assert answer_uses_tool_output(word_problem, episode("7", "40", answer=40)) == 1.0
    assert answer_uses_tool_output(word_problem, episode("40", answer=30)) == pytest.approx(0.75)
    assert answer_uses_tool_output(word_problem, episode("40", "7", answer=40)) == 0.0  # the last reply counts
    assert answer_uses_tool_output(word_problem, episode("error: exit code 1", answer=3)) == 0.0
    assert answer_uses_tool_output(word_problem, "Answer: 5") == 0.0


def test_python_tool_errors_are_observations(word_problem):
    env = python_env(word_problem, timeout_s=1)
    cases = [
        (call("python", code="while True: pass"), "timeout"),
        (call("python", code="raise ValueError('bad input')"), "ValueError: bad input"),
        (call("python", code="import os; os.abort()"), "error: crash"),
        (call("python"), 'python needs {"code"'),
        (call("shell", cmd="ls"), "unknown tool 'shell'"),
        ('<tool_call>{"name": "python", "arguments": </tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "python"', "not closed"),
    ]
    for text, expected in cases:
        result = run(env.step(turn(text)))
        assert not result.done and len(result.observations) == 1, text
        content = result.observations[0]["content"]
        assert content.startswith("error: ") and expected in content, (text, content)
    assert result.info["tool_errors"] == result.info["tool_calls"] == len(cases)  # malformed calls count as calls


def test_guess_number_reward_grows_with_informative_turns():
    record = dict(get_task("guess_number").prompts("train", 1, 3)[0], enable_thinking=False)
    env = make_env(record)
    run(env.reset(record))
    low, high, total, seen = record["low"], record["high"], 0.0, []
    while True:
        guess = (low + high) // 2
        result = run(env.step(turn(call("check", guess=guess))))
        total += result.reward
        seen.append(total)
        if result.done:
            break
        reply = result.observations[0]["content"]
        low, high = (guess + 1, high) if reply == "higher" else (low, guess - 1)
    assert total == 1.0 and result.info["correct"] and len(seen) > 1
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # the episode's reward never falls, and reaches 1


def test_guess_number_bad_guess_is_an_error_observation():
    record = dict(get_task("guess_number").prompts("train", 1, 3)[0], enable_thinking=False)
    env = make_env(record)
    run(env.reset(record))
    result = run(env.step(turn(call("check", guess="ten"))))
    assert result.observations[0]["content"].startswith("error: check needs") and result.reward == 0.0


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_single_turn_tasks_are_one_step_environments(task):
    record = dict(get_task(task).prompts("test", 1, 0)[0], enable_thinking=True, env="task")
    good = f"thinking</think>Answer: {record['answer']}" if task == "arithmetic" else "no idea</think>Answer: 1"
    env = make_env(record)
    assert run(env.reset(record)) == record["messages"]
    result = run(env.step(turn(good, thinking=True)))
    verifier = get_task(task).score(record, good)
    assert result.done and result.observations is None and result.reward == verifier.score


def test_tool_recipe_builds_environment_records():
    from latentforge.model.recipes import compose
    from latentforge.rl.config import GRPOConfig
    from latentforge.rl.prompts import build_records

    cfg = GRPOConfig.from_dict(compose(["recipe=grpo_tool_tiny"]).rl)
    assert cfg.rollout.episode_tokens() == 320 and cfg.rollout.max_turns == 3
    records = build_records([dict(cfg.prompts.tasks[0], num=3)], "train", seed=0, enable_thinking=False)
    assert all(r["env"] == "python_tool" and r["env_options"]["timeout_s"] == 2 for r in records)
    assert make_env(records[0]).limits["timeout_s"] == 2.0


def test_episode_metrics_rate_errors_per_attempted_call():
    from latentforge.rl.buffer import Sample
    from latentforge.rl.envs.metrics import episode_metrics

    def episode(turns, calls, errors, plain=False):
        return Sample(
            0,
            0,
            [1],
            [5, 6, 7],
            [0.0] * 3,
            [0, -1, 0],
            reward=0.0,
            reward_info={"tool_calls": calls, "tool_errors": errors},
            meta={} if plain else {"episode": True, "turns": turns, "generated_tokens": 2},
            completion_mask=[True, False, True],
        )

    m = episode_metrics([episode(2, 3, 1), episode(1, 1, 1), episode(9, 9, 9, plain=True)], prefix="eval_")
    assert m["eval_turns"] == 1.5 and m["eval_tool_calls"] == 2.0 and m["eval_tool_error_rate"] == 0.5
    assert m["eval_generated_tokens"] == 2.0 and m["eval_observation_tokens"] == 1.0
    assert episode_metrics([episode(1, 1, 1, plain=True)]) == {}
