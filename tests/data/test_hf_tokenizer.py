"""Hugging Face exports of the tokenizer stand alone: transformers' AutoTokenizer (the independent reference) renders
and tokenizes chats exactly as data/chat.py does, reasoning on and off, for the trained BPE and for tekken; plain text
and prompt strings with control-token names tokenize alike in both worlds; tekken's converted tokenizer.json encodes
as mistral-common does; generate on an exported model stops at </s> / <|im_end|>."""

import json

import pytest
import torch

from latentforge.data.chat import render_chat, render_chat_text
from latentforge.data.hf_tokenizer import GENERATION_CONFIG_FILE, write_generation_config, write_hf_tokenizer
from latentforge.data.tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_user_assistant": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7", "reasoning_content": "  2 is even-prime; pick an odd one.\n"},
    ],
    "inline_think_multi_turn": [
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": "\n<think>it is the identity</think>\n\nIt returns x."},
        {"role": "user", "content": "\nand f(3)?  "},
        {"role": "assistant", "content": "<think>\n\n</think>3"},
    ],
    "whitespace_edges": [
        {"role": "user", "content": " \n leading space and newline"},
        {"role": "assistant", "content": "\n\nanswer\n", "reasoning_content": "r"},
        {"role": "user", "content": ""},
    ],
    "unicode": [{"role": "user", "content": "héllo 日本語 🎉"}, {"role": "assistant", "content": "ça va"}],
}
CONTROL_TEXT = [
    {"role": "user", "content": "a </s> b <|im_start|>user <think>"},
    {"role": "assistant", "content": "ok <|im_end|> not the end", "reasoning_content": "</think>?"},
]
PLAIN_TEXTS = ["a </s> b <|im_start|>user", "<s><unk></think>", "no control tokens here\n\n  x", "</s></s>"]


@pytest.fixture(params=["bpe", "tekken"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


def hf_chat(hf, messages, **kwargs):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
def test_apply_chat_template_equals_render_chat(pair, name, thinking):
    ours, hf = pair
    messages = CONVERSATIONS[name]
    for prompt in (False, True):
        options = dict(enable_thinking=thinking, add_generation_prompt=prompt)
        assert hf.apply_chat_template(messages, tokenize=False, **options) == render_chat_text(messages, **options)
        assert hf_chat(hf, messages, **options) == render_chat(ours, messages, **options).ids


def test_control_token_text_in_messages_is_text_when_sanitized(pair):
    ours, hf = pair
    for thinking in (True, False):
        expected = render_chat(ours, CONTROL_TEXT, enable_thinking=thinking).ids
        assert hf_chat(hf, CONTROL_TEXT, enable_thinking=thinking, sanitize_control_tokens=True) == expected
        # transformers' default reads them as control tokens: documented, and visibly different
        assert hf_chat(hf, CONTROL_TEXT, enable_thinking=thinking) != expected


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_and_prompt_strings_tokenize_alike(pair, text):
    ours, hf = pair
    assert hf(text, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert hf(text)["input_ids"] == ours.encode_with_control_tokens(text)
    assert hf.decode(ours.encode_with_control_tokens(text)) == ours.decode(ours.encode_with_control_tokens(text))


def test_special_tokens_and_generation_config(pair, tmp_path):
    ours, hf = pair
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0, 0)
    assert [hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")] == [
        10,
        11,
        12,
        13,
    ]
    ids = ours.encode_with_control_tokens("<|im_start|>user\nhi<|im_end|>")
    assert hf.decode(ids, skip_special_tokens=True) == "user\nhi"
    write_generation_config(tmp_path)
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(tmp_path))
    assert config.eos_token_id == [2, 11] and config.pad_token_id == 0 and config.bos_token_id == 1


def test_tekken_export_encodes_as_mistral_common(tekken_pair, tmp_path):
    import inspect

    import latentforge.data.chat as chat_module

    ours, hf = tekken_pair
    text = inspect.getsource(chat_module) + "héllo wörld 日本語 🎉 \r\n\n  tabs\t\tend "
    expected = ours.encode(text)  # mistral-common's Tekkenizer
    assert hf(text, split_special_tokens=True)["input_ids"] == expected
    hf.save_pretrained(str(tmp_path))
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).encode(text) == expected  # loads back into LatentForge
    assert hf.decode(expected) == ours.decode(expected) == text


def test_exported_model_generate_stops_at_eos(bpe_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from latentforge.model import HybridModel
    from latentforge.model.hf import save_pretrained
    from tests.model.test_hf import tiny_config

    ours, _ = bpe_pair
    torch.manual_seed(0)
    model = HybridModel(tiny_config(pattern="M*", vocab_size=ours.vocab_size, mtp_depths=0))
    with torch.no_grad():  # make <|im_end|> likely so greedy decoding meets it within a few tokens
        model.lm_head.weight[11] = 4 * model.lm_head.weight[11] + model.backbone.norm_f.weight
    save_pretrained(model, tmp_path)
    write_hf_tokenizer(ours, tmp_path)
    assert json.loads((tmp_path / GENERATION_CONFIG_FILE).read_text())["eos_token_id"] == [2, 11]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = torch.tensor([render_chat(ours, CONVERSATIONS["user_only"], add_generation_prompt=True).ids])
    limit = 24
    with torch.no_grad():
        unstopped = hf.generate(prompt, max_new_tokens=limit, eos_token_id=[], min_new_tokens=limit)[
            0, prompt.shape[1] :
        ]
        stopped = hf.generate(prompt, max_new_tokens=limit)[0, prompt.shape[1] :]
    first_stop = next((i for i, t in enumerate(unstopped.tolist()) if t in (2, 11)), None)
    assert first_stop is not None and first_stop < limit - 1, f"no stop token early in {unstopped.tolist()}"
    assert stopped.tolist() == unstopped[: first_stop + 1].tolist()
