"""The Jinja chat template of Hugging Face exports: the layout of data/chat.py, character for character.

`tokenizer.apply_chat_template(messages, enable_thinking=..., add_generation_prompt=...)` on an export renders what
`data.chat.render_chat_text` renders and, tokenized, gives the ids of `data.chat.render_chat`
(tests/data/test_hf_tokenizer.py checks both, reasoning on and off). Reasoning comes from `reasoning_content` or a
leading `<think>...</think>` block of the content, as in `data.chat.split_reasoning`.

Tool calls (`tool_calls` of an assistant message, `{"name", "arguments"}` or OpenAI's `{"type": "function",
"function": {...}}`) render as data/chat.py renders them, `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
after the answer, and `tool` messages as `<tool_response>` blocks. Arguments given as a JSON string are written as
given (Jinja has no JSON parser): identical to data/chat.py when the string is in `json.dumps` style.

Control-token text inside a message is plain text in LatentForge; transformers encodes it as plain text too with
`apply_chat_template(..., sanitize_control_tokens=True)` (its default encodes it as control tokens).
"""

CHAT_TEMPLATE = (
    "{% set thinking = enable_thinking if enable_thinking is defined else true %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'tool' %}"
    "<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif message['role'] != 'assistant' %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% set reasoning = none %}"
    "{% set stripped = content.lstrip() %}"
    "{% if stripped.startswith('<think>') and '</think>' in stripped[7:] %}"
    "{% set reasoning = stripped[7:].split('</think>', 1)[0] %}"
    "{% set content = stripped[7:].split('</think>', 1)[1].lstrip() %}"
    "{% endif %}"
    "{% if message['reasoning_content'] is defined and message['reasoning_content'] is string %}"
    "{% set reasoning = message['reasoning_content'] %}"
    "{% endif %}"
    "{% set reasoning = reasoning.strip() if reasoning is string else '' %}"
    "{% if thinking and reasoning %}"
    "<think>\n{{ reasoning }}\n</think>\n"
    "{% else %}"
    "<think></think>"
    "{% endif %}"
    "{% set ns = namespace(text=content) %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined and call['function'] is mapping else call %}"
    "{% set args = fn['arguments'] if fn['arguments'] is defined else {} %}"
    "{% if args is string %}{% set args_text = args.strip() or '{}' %}{% else %}{% set args_text = args|tojson %}"
    "{% endif %}"
    "{% set ns.text = ns.text + ('\n' if ns.text else '') + '<tool_call>{\"name\": ' + fn['name']|tojson"
    " + ', \"arguments\": ' + args_text + '}</tool_call>' %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ ns.text }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n<think>"
    "{% if not thinking %}</think>{% endif %}"
    "{% endif %}"
)
