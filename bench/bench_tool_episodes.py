"""Held-out python_tool episodes of a checkpoint, played greedily one by one (engine + environment, no Ray), with
what GRPO's evaluation does not split out: exact answers, the task's partial-credit reward, and how often the
final answer is the number the tool printed (`answer_uses_tool_output` == 1).

    python bench/bench_tool_episodes.py CHECKPOINT [--tokenizer SPEC] [--problems 64] [--partial-credit 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import math

from latentforge.data.chat import render_chat, render_observation
from latentforge.model.engine import Engine, EngineConfig, SamplingParams
from latentforge.rl.envs import make_env
from latentforge.rl.envs.episode import assistant_message
from latentforge.rl.envs.python_tool import answer_uses_tool_output
from latentforge.rl.generate import load_model, load_tokenizer_for
from latentforge.rl.rewards import get_task


def play(engine, tok, record, max_turns=3, max_new_tokens=64):
    """One greedy episode: (text after the prompt, environment reward, tool calls, tool errors)."""
    env = make_env(record)
    ids = render_chat(tok, asyncio.run(env.reset(record)), add_generation_prompt=True, enable_thinking=False).ids
    text, result = "", None
    for turn in range(max_turns):
        engine.add_request(
            ids,
            SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tok.im_end_id,)),
            request_id=turn,
        )
        finished = []
        while engine.has_unfinished():
            finished += engine.step()
        generated = finished[-1].token_ids
        closed = generated[-1:] == [tok.im_end_id]
        turn_text = tok.decode(generated[:-1] if closed else generated)
        text += turn_text
        result = asyncio.run(env.step(assistant_message(turn_text, False)))
        if result.done or not result.observations or not closed:
            break
        observation = render_observation(tok, result.observations, enable_thinking=False)
        text += "<|im_end|>" + tok.decode(observation)
        ids = ids + generated + observation
    return (
        text,
        result.reward if result.done else 0.0,
        result.info.get("tool_calls", 0),
        result.info.get("tool_errors", 0),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--tokenizer", default="", help="default: the checkpoint's tokenizer.json")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--partial-credit", type=float, default=0.5)
    args = parser.parse_args()
    model, tok = load_model(args.checkpoint, "cpu"), load_tokenizer_for(args.checkpoint, args.tokenizer)
    engine = Engine(model, EngineConfig(max_batch=1, max_seq_len=1024, draft_tokens=0))
    rewards, exact, copied, calls, errors = [], 0, 0, 0, 0
    for record in get_task("python_tool").prompts("test", args.problems, 0):
        record.update(enable_thinking=False, partial_credit=args.partial_credit)
        text, reward, n_calls, n_errors = play(engine, tok, record)
        rewards.append(reward)
        exact += reward == 1.0
        copied += answer_uses_tool_output(record, text) == 1.0
        calls, errors = calls + n_calls, errors + n_errors
    n = len(rewards)
    mean = sum(rewards) / n
    se = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1) / n)
    print(
        f"{args.checkpoint}: {n} held-out problems, greedy: reward {mean:.3f} +- {se:.3f}, exact {exact}/{n}, "
        f"answer = tool output {copied}/{n}, tool calls {calls / n:.2f} per episode, tool-error rate "
        f"{errors / max(calls, 1):.2f}"
    )


if __name__ == "__main__":
    main()
