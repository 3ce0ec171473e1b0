"""builtin:tool_chat: transcripts are valid chats whose tool outputs are exactly what the built-in environments
answer (replayed through them, the python tool in the real sandbox), split like builtin:arithmetic_chat."""

import asyncio

from latentforge.data.chat import format_tool_calls, normalize_record, render_chat
from latentforge.data.config import DataConfig
from latentforge.data.sft import build_sft_loader
from latentforge.data.synthetic import synthetic_splits
from latentforge.data.tool_chat import tool_chat_splits
from latentforge.rl.envs import make_env
from latentforge.rl.envs.episode import assistant_message
from latentforge.rl.rewards import get_task


def replay(env, record, messages):
    """Feed the transcript's assistant turns to `env`; return its observations per turn and the total reward."""

    async def play():
        await env.reset(record)
        seen, total = [], 0.0
        for m in messages:
            if m["role"] != "assistant":
                continue
            text = (
                m["content"] + ("\n" if m["content"] else "") + format_tool_calls(m["tool_calls"])
                if m.get("tool_calls")
                else m["content"]
            )
            result = await env.step(assistant_message(text, thinking=False))
            total += result.reward
            seen.append(result.observations)
            if result.done:
                break
        return seen, total

    return asyncio.run(play())


def tool_messages(messages):
    out, current = [], None
    for m in messages:
        if m["role"] == "assistant":
            current = []
            out.append(current)
        elif m["role"] == "tool":
            current.append(m)
    return [o for o in out if o]


def test_python_transcripts_replay_through_the_python_tool_env():
    splits = tool_chat_splits(60, 10, seed=7)
    problems = {f"python-{p['id']}": p for p in synthetic_splits(60, 10, seed=7)["train"]}
    python = [r for r in splits["train"] if r["kind"] == "python"]
    typo = [r for r in python if len(r["messages"]) > 5]
    assert len(python) == 60 and typo, "one in ten transcripts shows a recovered error"
    for r in python[:2] + typo[:1]:
        p = problems[r["id"]]
        record = {
            "task": "python_tool",
            "env": "python_tool",
            "answer": p["answer"],
            "enable_thinking": False,
            "messages": r["messages"][:2],
        }
        observations, reward = replay(make_env(record), record, r["messages"])
        assert [o for o in observations if o] == tool_messages(r["messages"]) and reward == 1.0


def test_guess_transcripts_replay_through_the_guess_env():
    records = [r for r in tool_chat_splits(60, 10, seed=7)["train"] if r["kind"] == "guess"]
    assert len(records) == 20
    for r in records[:5]:
        answer = int(r["messages"][-1]["content"].split()[-1])
        high = int(r["messages"][0]["content"].split(" to ")[1].split(".")[0])
        record = {
            "task": "guess_number",
            "env": "guess_number",
            "low": 1,
            "high": high,
            "answer": answer,
            "messages": r["messages"][:1],
            "enable_thinking": False,
        }
        observations, reward = replay(make_env(record), record, r["messages"])
        assert reward == 1.0 and observations[:-1] == tool_messages(r["messages"])[:-1]


def test_held_out_problems_stay_held_out_and_records_are_valid():
    splits = tool_chat_splits(200, 20, seed=1234)
    train_ids = {r["id"] for r in splits["train"]}
    test_questions = {p["question"] for p in get_task("python_tool").prompts("test", 20, 1234)}
    assert not any(
        r["messages"][1]["content"].split("\n")[0] in test_questions for r in splits["train"] if r["kind"] == "python"
    )
    assert len(train_ids) == len(splits["train"])
    for r in splits["train"][:50]:
        assert normalize_record({"messages": r["messages"]}) == r["messages"]


def test_sft_loader_reads_builtin_tool_chat(bpe_tok, cache_dir):
    cfg = DataConfig(
        kind="sft", paths=["builtin:tool_chat"], synthetic_num_train=30, synthetic_num_heldout=5, enable_thinking=False
    )
    it = build_sft_loader(cfg, bpe_tok, seq_len=512, micro_batch_size=2)
    assert it.source.stats["conversations"] == 40  # 30 python + 10 guess
    batch = next(it)
    labels = batch["labels"][batch["labels"] != -100].tolist()
    assert bpe_tok.im_end_id in labels
    chat = render_chat(bpe_tok, tool_chat_splits(30, 5)["train"][0]["messages"], enable_thinking=False)
    assert "<tool_call>" in bpe_tok.decode([i for i, m in zip(chat.ids, chat.assistant_mask) if m])
