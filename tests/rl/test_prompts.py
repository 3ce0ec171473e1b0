"""The prompt source: deterministic order, given-back prompts served first, exact resume."""

import pytest

from latentforge.data.tokenizer import load_tokenizer
from latentforge.rl.prompts import PromptSource, build_records, prompt_token_ids


def records(n):
    return [{"id": f"p{i}", "task": "arithmetic", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


def test_order_is_a_fresh_permutation_each_epoch_and_deterministic():
    a, b = PromptSource(records(10), seed=3), PromptSource(records(10), seed=3)
    first = [a.take()[1]["id"] for _ in range(20)]
    assert first == [b.take()[1]["id"] for _ in range(20)]
    assert sorted(first[:10]) == sorted(first[10:]) == sorted(f"p{i}" for i in range(10))
    assert first[:10] != first[10:]
    assert [PromptSource(records(10), shuffle=False).take()[1]["id"] for _ in range(1)] == ["p0"]


def test_given_back_prompts_come_first_and_resume_is_exact():
    src = PromptSource(records(7), seed=1)
    taken = [src.take() for _ in range(5)]
    src.give_back([taken[3][0], taken[1][0]])
    state = src.state_dict()
    resumed = PromptSource(records(7), seed=1)
    resumed.load_state_dict(state)
    expected = [src.take() for _ in range(9)]
    got = [resumed.take() for _ in range(9)]
    assert got == expected
    assert [u for u, _ in got[:3]] == [taken[1][0], taken[3][0], 5]
    with pytest.raises(ValueError, match="never handed out"):
        src.give_back([10**6])
    with pytest.raises(ValueError, match="same rl.prompts"):
        PromptSource(records(8), seed=1).load_state_dict(state)


def test_task_records_render_a_generation_prompt():
    tok = load_tokenizer()
    recs = build_records([{"name": "arithmetic", "num": 3}, {"name": "countdown", "num": 2}], "train", seed=1234)
    assert [r["task"] for r in recs] == ["arithmetic"] * 3 + ["countdown"] * 2
    ids = prompt_token_ids(tok, recs[0])
    assert ids[-3:] == [tok.im_start_id, *tok.encode("assistant\n"), tok.think_id][-3:]
    assert tok.im_end_id in ids
