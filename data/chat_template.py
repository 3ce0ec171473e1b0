"""The Jinja chat template of Hugging Face exports: the layout of data/chat.py, character for character.

`tokenizer.apply_chat_template(messages, enable_thinking=..., add_generation_prompt=...)` on an export renders what
`data.chat.render_chat_text` renders and, tokenized, gives the ids of `data.chat.render_chat`
(tests/data/test_hf_tokenizer.py checks both, reasoning on and off). Reasoning comes from `reasoning_content` or a
leading `<think>...</think>` block of the content, as in `data.chat.split_reasoning`.

Control-token text inside a message is plain text in LatentForge; transformers encodes it as plain text too with
`apply_chat_template(..., sanitize_control_tokens=True)` (its default encodes it as control tokens).
"""

CHAT_TEMPLATE = (
    "{% set thinking = enable_thinking if enable_thinking is defined else true %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] != 'assistant' %}"
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
    "{{ content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n<think>"
    "{% if not thinking %}</think>{% endif %}"
    "{% endif %}"
)
