"""Verifiable tasks, the sandbox (time / memory limits) and the contained failure of user reward functions."""

import time

import pytest

from latentforge.rl.rewards import IsolatedFunction, RewardFunctionConfig, RewardScorer, get_task, run_untrusted_code
from latentforge.rl.rewards.countdown import check_countdown, make_instance

PLUGINS = "tests.rl.reward_plugins"


def test_arithmetic_task_scores_final_answer_only():
    task = get_task("arithmetic")
    record = task.prompts("test", 2, seed=1234)[0]
    record["enable_thinking"] = True
    answer = record["answer"]
    assert task.score(record, f"\nlet me think\n</think>\nAnswer: {answer}").score == 1.0
    assert task.score(record, f"\nAnswer: {answer}\n</think>\nAnswer: {answer + 1}").score == 0.0
    assert task.score(record, f"\nAnswer: {answer} (never closed").score == 0.0  # answer inside open reasoning
    off = dict(record, enable_thinking=False)
    assert task.score(off, f"Answer: {answer}").correct is True
    # partial credit (a task option): closeness of a wrong number, never counted as correct
    shaped = dict(off, answer=80, partial_credit=0.5)
    near = task.score(shaped, "Answer: 60")
    assert near.score == pytest.approx(0.5 * (1 - 20 / 80)) and near.correct is False
    assert task.score(shaped, "Answer: 80").score == 1.0
    assert task.score(shaped, "Answer: 500").score == 0.0 and task.score(shaped, "no number").score == 0.0
    train_ids = {r["question"] for r in task.prompts("train", 2000, seed=1234)}
    assert not train_ids & {r["question"] for r in task.prompts("test", 500, seed=1234)}


def test_countdown_generation_is_solvable_and_verifier_is_strict():
    import random

    rng = random.Random(0)
    for _ in range(50):
        inst = make_instance(rng)
        assert 1 <= inst["target"] <= 999 and len(inst["numbers"]) == 3
    assert check_countdown([3, 5, 7], 22, "3 * 5 + 7")[0]
    assert check_countdown([3, 5, 7], 4, "(3 + 5) / 2")[0] is False  # 2 is not a given number
    assert check_countdown([3, 5, 7], 15, "3 * 5")[0] is False  # 7 unused
    assert check_countdown([3, 5, 7], 1, "__import__('os')")[0] is False
    assert check_countdown([3, 5, 6], 3, "6 / (5 - 3) * 1")[0] is False
    task = get_task("countdown")
    rec = dict(task.prompts("train", 1, seed=0)[0], enable_thinking=False)
    assert task.prompts("train", 1, seed=0)[0]["target"] == rec["target"]  # deterministic
    assert task.score(rec, "Answer: 1 +").score == 0.0


def test_untrusted_code_limits():
    ok = run_untrusted_code("print(6 * 7)")
    assert ok.status == "ok" and ok.stdout.strip() == "42"
    start = time.perf_counter()
    hung = run_untrusted_code("while True: pass", timeout_s=1.0)
    assert hung.status == "timeout" and time.perf_counter() - start < 10
    assert run_untrusted_code("x = bytearray(1 << 30)", memory_mb=128).status == "memory"
    assert run_untrusted_code("import os; os.kill(os.getpid(), 11)").status == "crash"
    assert run_untrusted_code("raise SystemExit(4)").status == "error"
    flood = run_untrusted_code("while True: print('x' * 1000)", timeout_s=5.0, output_bytes=1 << 16)
    assert flood.status == "output_limit" and len(flood.stdout) <= 1 << 16
    # the program's children die with it
    forked = run_untrusted_code(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)'])\nwhile True: pass",
        timeout_s=1.0,
    )
    assert forked.status == "timeout"


def test_program_task_runs_generated_code():
    task = get_task("program")
    rec = dict(task.prompts("test", 1, seed=1234)[0], enable_thinking=False)
    good = f"```python\nprint({rec['answer']})\n```"
    assert task.score(rec, good).score == 1.0
    task.timeout_s = 0.5
    hang = task.score(rec, "```python\nwhile True: pass\n```")
    assert hang.score == 0.0 and hang.info["status"] == "timeout"


def test_isolated_function_survives_hang_crash_and_raise():
    fn = IsolatedFunction(f"{PLUGINS}:hangs", timeout_s=1.0).start()
    assert fn.call({}, "fine") == ("ok", 1.0)
    status, message = fn.call({}, "hang")
    assert status == "timeout" and "killed" in message
    assert fn.call({}, "fine again") == ("ok", 1.0)  # restarted
    fn.close()
    crash = IsolatedFunction(f"{PLUGINS}:crashes", timeout_s=5.0).start()
    assert crash.call({}, "crash")[0] == "crash"
    assert crash.call({}, "ok") == ("ok", 0.5)
    crash.close()
    mem = IsolatedFunction(f"{PLUGINS}:eats_memory", timeout_s=5.0, memory_mb=512).start()
    status, message = mem.call({}, "")
    assert status == "error" and "MemoryError" in message
    mem.close()
    with pytest.raises(RuntimeError, match="could not be loaded"):
        IsolatedFunction("tests.rl.no_such_module:fn").start()


def test_scorer_contains_every_failure():
    scorer = RewardScorer(
        [
            RewardFunctionConfig(f"{PLUGINS}:length_bonus", weight=0.5, isolation="inline"),
            RewardFunctionConfig(f"{PLUGINS}:raises", isolation="inline"),
            RewardFunctionConfig(f"{PLUGINS}:hangs", isolation="process", timeout_s=1.0),
            RewardFunctionConfig(f"{PLUGINS}:returns_garbage", isolation="process"),
        ]
    )
    record = dict(get_task("arithmetic").prompts("test", 1, seed=1234)[0], enable_thinking=False)
    result = scorer.score(record, f"Answer: {record['answer']} hang")
    # task 1.0 + 0.5 * length bonus (1.0); the raising, hanging and garbage functions add 0 and are reported
    assert result.score == pytest.approx(1.5)
    assert result.correct is True
    statuses = {f["function"]: f["status"] for f in result.info["failures"]}
    assert statuses == {"raises": "error", "hangs": "timeout", "returns_garbage": "error"}
    again = scorer.score(record, "Answer: -1")
    # task 0 + 0.5 * length bonus (10 characters: 1.0) + hangs 1.0 (no hang this time)
    assert again.score == pytest.approx(1.5) and again.correct is False
    assert scorer.failures == 5
    scorer.close()
    with pytest.raises(ValueError, match="isolation"):
        RewardFunctionConfig("a:b", isolation="thread")


def test_non_finite_rewards_score_zero_and_are_recorded(caplog):
    """NaN / inf from a user reward (sandboxed or inline, a float or a RewardResult) is a recorded failure worth 0:
    the sample's reward stays finite, so it never reaches the advantages or the loss."""
    import logging
    import math

    from latentforge.rl.actors.reward import RewardWorker
    from latentforge.rl.buffer import Sample
    from latentforge.rl.config import RewardConfig

    functions = [
        dict(target=f"{PLUGINS}:returns_nan", isolation="process"),
        dict(target=f"{PLUGINS}:returns_inf_result", isolation="inline"),
        dict(target=f"{PLUGINS}:returns_numpy", isolation="process", weight=2.0),  # a numpy scalar counts
        dict(target=f"{PLUGINS}:length_bonus", isolation="inline", weight=0.5),
    ]
    worker = RewardWorker(RewardConfig(functions=functions), None)
    record = dict(get_task("arithmetic").prompts("test", 1, seed=1234)[0], enable_thinking=False)
    completion = worker.tokenizer.encode(f"Answer: {record['answer']}")
    sample = Sample(
        group_id=0,
        sample_index=0,
        prompt_ids=[1],
        completion_ids=completion,
        logprobs=[0.0] * len(completion),
        versions=[0] * len(completion),
    )
    again = Sample(
        group_id=0,
        sample_index=1,
        prompt_ids=[1],
        completion_ids=completion,
        logprobs=[0.0] * len(completion),
        versions=[0] * len(completion),
    )
    with caplog.at_level(logging.WARNING, logger="latentforge.rl.rewards.scorer"):
        worker.score([sample, again], [record, record])
    worker.close()
    # task 1.0 + 2 * 0.25 + 0.5 * length bonus; NaN and inf add nothing
    assert math.isfinite(sample.reward)
    assert sample.reward == pytest.approx(1.0 + 2 * 0.25 + 0.5 * min(len(sample.text), 10) / 10)
    statuses = {f["function"]: f["status"] for f in sample.reward_info["failures"]}
    assert statuses == {"returns_nan": "non_finite", "returns_inf_result": "non_finite"}
    assert again.reward == sample.reward and worker.scorer.failures == 4  # each failure counted...
    lines = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(lines) == 2 and "returns_nan" in lines[0] and "got nan" in lines[0]  # ...logged once per function


def test_overflowing_weighted_sum_is_a_recorded_failure():
    scorer = RewardScorer(
        [
            RewardFunctionConfig(f"{PLUGINS}:length_bonus", weight=1e308, isolation="inline"),
            RewardFunctionConfig(f"{PLUGINS}:length_bonus", weight=1e308, isolation="inline", name="again"),
        ]
    )
    record = dict(get_task("arithmetic").prompts("test", 1, seed=1234)[0], enable_thinking=False)
    result = scorer.score(record, "0123456789")
    assert result.score == 0.0 and result.info["failures"][0]["status"] == "non_finite"
