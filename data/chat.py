"""ChatML rendering with the reasoning switch and per-token loss masks.

Layout (control tokens in caps are single ids, everything else is encoded text):

    IM_START "system\\n" {content} IM_END "\\n"
    IM_START "user\\n" {content} IM_END "\\n"
    IM_START "assistant\\n" THINK "\\n" {reasoning} "\\n" THINK_END "\\n" {content} IM_END "\\n"   (thinking on)
    IM_START "assistant\\n" THINK THINK_END {content} IM_END "\\n"                      (thinking off, or none)

The generation prompt is IM_START "assistant\\n" THINK (thinking on) or IM_START "assistant\\n" THINK THINK_END
(thinking off). The loss covers exactly what the model produces after that prompt: the reasoning, THINK_END, the
answer and IM_END; never the prompt, the other roles or the newline after IM_END.

The switch is per conversation, as Nemotron's chat template takes `enable_thinking` per request
(`chat_template_kwargs`): the dataset's `data.enable_thinking` is the default and an SFT record's own
`"enable_thinking": true|false` overrides it (`record_enable_thinking`).

Tool use (Hermes / Nemotron style; `<tool_call>` and `<tool_response>` are plain text, not control tokens):

    assistant {content} with `tool_calls`: {content} ["\n" if content] CALL ("\n" CALL)*    (all trained)
        CALL = "<tool_call>" json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) "</tool_call>"
        (default separators ", " and ": ", keys in the order given; `arguments` is an object, or a JSON string of
        one, as OpenAI messages carry it: it is parsed before dumping)
    IM_START "tool\n" "<tool_response>\n" {content} "\n</tool_response>" IM_END "\n"      (never trained)

`tool_calls` entries are {"name", "arguments"} or OpenAI's {"type": "function", "function": {"name", "arguments"}}.
The calls are written after the answer inside the same assistant turn, so the model ends the turn (IM_END) after
its calls and the environment answers with one `tool` message per call. `parse_tool_calls` reads them back from
generated text; a malformed call is reported as an error string, never raised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

CHAT_FORMAT_VERSION = 2  # bump when the layout changes (part of tokenization cache keys)
ROLES = ("system", "user", "assistant", "tool")
_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ChatTokens:
    ids: List[int]
    assistant_mask: List[bool]  # True where the token is produced by the assistant (gets the loss as a target)


def split_reasoning(message: dict) -> Tuple[Optional[str], str]:
    """(reasoning, answer) of an assistant message: `reasoning_content`, or a leading <think>...</think> block."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    match = _THINK_RE.match(content)
    if match:
        if reasoning is None:
            reasoning = match.group(1)
        content = content[match.end() :]
    reasoning = reasoning.strip() if isinstance(reasoning, str) else None
    return (reasoning or None), content


def normalize_tool_call(call) -> dict:
    """{"name", "arguments"} of one tool call given as {"name", "arguments"} or OpenAI's
    {"type": "function", "function": {...}}; `arguments` may be a JSON string of an object. Raises ValueError."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object with name and arguments, got {type(call).__name__}")
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string 'name', got {name!r}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call {name!r}: 'arguments' is not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {name!r}: 'arguments' must be a JSON object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


def format_tool_calls(calls: Sequence) -> str:
    """The text of an assistant turn's tool calls (the module docstring's CALL, joined by newlines)."""
    return "\n".join(
        TOOL_CALL_OPEN + json.dumps(normalize_tool_call(c), ensure_ascii=False) + TOOL_CALL_CLOSE for c in calls
    )


def parse_tool_calls(text: str) -> Tuple[List[dict], List[str]]:
    """(calls, errors) of generated assistant text (reasoning excluded): every <tool_call>...</tool_call> block
    parsed into {"name", "arguments"}, and one readable error per malformed block or unclosed <tool_call>."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    calls, errors = [], []
    for i, match in enumerate(_TOOL_CALL_RE.finditer(text)):
        body = match.group(1).strip()
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            errors.append(
                f"tool call {i + 1} is not valid JSON ({exc.msg} at char {exc.pos}); write "
                '<tool_call>{"name": "...", "arguments": {...}}</tool_call>'
            )
            continue
        try:
            calls.append(normalize_tool_call(payload))
        except ValueError as exc:
            errors.append(f"tool call {i + 1}: {exc}")
    tail = _TOOL_CALL_RE.sub("", text)
    if TOOL_CALL_OPEN in tail:
        errors.append("a <tool_call> is not closed: end each call with </tool_call>")
    return calls, errors


def assistant_answer(message: dict) -> str:
    """The answer part of an assistant turn as rendered: its content, then its tool calls."""
    _, answer = split_reasoning(message)
    calls = message.get("tool_calls") or []
    if not calls:
        return answer
    return answer + ("\n" if answer else "") + format_tool_calls(calls)


def record_enable_thinking(record: dict, default: bool) -> bool:
    """The reasoning switch of one SFT record: its `"enable_thinking"` (true/false) or, absent or null, the
    dataset's `default`. Raises ValueError for any other value."""
    value = record.get("enable_thinking") if isinstance(record, dict) else None
    if value is None:
        return bool(default)
    if not isinstance(value, bool):
        raise ValueError(f"'enable_thinking' must be true or false, got {value!r}")
    return value


def normalize_record(record) -> List[dict]:
    """The messages of one SFT record: {"messages": [...]} or {"prompt", "completion"[, "system"]}.

    Raises ValueError with the reason for anything malformed.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in record and "completion" in record:
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"]})
        messages.append({"role": "user", "content": record["prompt"]})
        assistant = {"role": "assistant", "content": record["completion"]}
        if record.get("reasoning_content") is not None:
            assistant["reasoning_content"] = record["reasoning_content"]
        messages.append(assistant)
    else:
        raise ValueError(f"expected 'messages' or 'prompt' and 'completion' (keys: {', '.join(map(str, record))})")
    record_enable_thinking(record, True)  # a malformed switch is an error of the record
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is {type(m).__name__}, expected an object with role and content")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; supported roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}) content must be a string")
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            raise ValueError(f"message {i} reasoning_content must be a string")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ValueError(f"message {i}: tool_calls must be a list, and only in assistant messages")
            for call in calls:
                try:
                    normalize_tool_call(call)
                except ValueError as exc:
                    raise ValueError(f"message {i}: {exc}") from None
    return messages


def _segments(messages: Sequence[dict], enable_thinking: bool, add_generation_prompt: bool):
    """(text or control-token name, trained) pieces of the layout in the module docstring."""
    out = []
    for m in messages:
        role = m["role"]
        out += [("<|im_start|>", False), (f"{role}\n", False)]
        if role == "tool":
            out += [
                (TOOL_RESPONSE_OPEN + m["content"] + TOOL_RESPONSE_CLOSE, False),
                ("<|im_end|>", False),
                ("\n", False),
            ]
            continue
        if role != "assistant":
            out += [(m["content"], False), ("<|im_end|>", False), ("\n", False)]
            continue
        reasoning, _ = split_reasoning(m)
        answer = assistant_answer(m)
        if enable_thinking and reasoning:
            out += [("<think>", False), (f"\n{reasoning}\n", True), ("</think>", True), ("\n", True)]
        else:
            # After a thinking-on generation prompt (ending in THINK) the model itself closes the empty block.
            out += [("<think>", False), ("</think>", enable_thinking)]
        out += [(answer, True), ("<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        out += [("<|im_start|>", False), ("assistant\n", False), ("<think>", False)]
        if not enable_thinking:
            out.append(("</think>", False))
    return out


def _merge_text(segments, control_names):
    """Adjacent text pieces joined (between two control tokens they always share their `trained` flag)."""
    out = []
    for piece, trained in segments:
        if out and piece not in control_names and out[-1][0] not in control_names:
            assert out[-1][1] == trained, "adjacent text pieces with different loss masks"
            out[-1] = (out[-1][0] + piece, trained)
        else:
            out.append((piece, trained))
    return out


def render_chat(
    tokenizer, messages: Sequence[dict], *, enable_thinking: bool = True, add_generation_prompt: bool = False
) -> ChatTokens:
    """Token ids and assistant mask of a conversation. Message text is encoded as plain text: a "<|im_end|>"
    typed by a user stays text and can not end a turn. The text between two control tokens is encoded as one
    string (as a Hugging Face tokenizer encodes the rendered template), so "user\n" + "\nhi" is "user\n\nhi"."""
    ids: List[int] = []
    mask: List[bool] = []
    for piece, trained in _merge_text(
        _segments(messages, enable_thinking, add_generation_prompt), tokenizer.special_ids
    ):
        if piece in tokenizer.special_ids:
            piece_ids = [tokenizer.special_ids[piece]]
        elif piece:
            piece_ids = tokenizer.encode_chat_text(piece)
        else:
            continue
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return ChatTokens(ids, mask)


def render_chat_text(
    messages: Sequence[dict], *, enable_thinking: bool = True, add_generation_prompt: bool = False
) -> str:
    """The same conversation as one string (for reading and debugging; decode(render_chat(...).ids) equals it)."""
    return "".join(p for p, _ in _segments(messages, enable_thinking, add_generation_prompt))


def render_observation(tokenizer, messages: Sequence[dict], *, enable_thinking: bool = True) -> List[int]:
    """The ids that follow a generated assistant turn (which ends in IM_END) in a multi-turn rollout: the "\n"
    after IM_END, the environment's messages (tool / user turns) and the next generation prompt, exactly as
    `render_chat` renders them inside the whole conversation."""
    return (
        tokenizer.encode_chat_text("\n")
        + render_chat(tokenizer, messages, enable_thinking=enable_thinking, add_generation_prompt=True).ids
    )


def prompt_messages(messages: Sequence[dict]) -> List[dict]:
    """The conversation up to (not including) its last assistant turn: the prompt for generation / GRPO."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return list(messages[:last])
