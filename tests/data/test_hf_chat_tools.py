"""Tool calls and the tool role in the exported chat template: transformers' apply_chat_template on an export
renders and tokenizes a tool-using conversation exactly as data/chat.py does (BPE and tekken, reasoning on and off,
with a generation prompt after the tool results)."""

import pytest

from latentforge.data.chat import render_chat, render_chat_text

from .test_hf_tokenizer import hf_chat, pair  # noqa: F401  (pair: a fixture)

pytest.importorskip("transformers")

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "two tools",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C", "days": [1, 2]}},
            },
            {"name": "get_time", "arguments": '{"tz": "CET"}'},
        ],
    },
    {"role": "tool", "content": '{"temp": 12}'},
    {"role": "tool", "content": "13:00"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "noop", "arguments": {}}]},
    {"role": "tool", "content": ""},
]


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_calls_and_tool_role_render_alike(pair, thinking):  # noqa: F811
    ours, hf = pair
    for messages in (TOOL_CONVERSATION, TOOL_CONVERSATION + [{"role": "assistant", "content": "12 °C, 13:00."}]):
        prompt = messages[-1]["role"] == "tool"
        options = dict(enable_thinking=thinking, add_generation_prompt=prompt)
        assert hf.apply_chat_template(messages, tokenize=False, **options) == render_chat_text(messages, **options)
        assert hf_chat(hf, messages, **options) == render_chat(ours, messages, **options).ids
