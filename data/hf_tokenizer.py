"""Tokenizer files that make a Hugging Face export stand alone (transformers, vLLM, lm-evaluation-harness, PEFT).

    write_hf_tokenizer(tokenizer, out_dir)  -> tokenizer.json, tokenizer_config.json (bos/eos/pad, special tokens,
                                               the chat template of data/chat_template.py), generation_config.json

`tokenizer.json` is the tokenizer's own file (a trained BPE, or a released tokenizer.json) or, for `tekken`, the
Tekken vocabulary converted to a byte-level BPE with its 1,000 control slots as special tokens named as
LatentForge names them (`<unk>`, `<s>`, `</s>`, `<|im_start|>`..., the rest `<SPECIAL_i>`). Generation stops at
`</s>` (end of document) and `<|im_end|>` (end of a chat turn). See data/tokenizer.py for how control-token text
tokenizes in both worlds.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Optional

from latentforge.data.chat_template import CHAT_TEMPLATE
from latentforge.data.tokenizer import SPECIAL_TOKENS, HFTokenizer, TekkenTokenizer, Tokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
STOP_TOKENS = ("</s>", "<|im_end|>")
CHAT_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def byte_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bpe_from_ranks(ranks: list) -> tuple:
    """(vocab, merges) of a byte-level BPE equivalent to tiktoken-style ranks (token bytes in rank order): each
    token of two or more bytes is the merge of every split into two lower-ranked tokens, ordered by its rank."""
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    table = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab, merges = {}, []
    for rank, token in enumerate(ranks):
        vocab[text(token)] = rank
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in rank_of and token[i:] in rank_of]
        splits.sort(key=lambda pair: (rank_of[pair[0]], rank_of[pair[1]]))
        merges += [(text(left), text(right)) for left, right in splits]
    return vocab, merges


def tekken_to_hf(tokenizer: TekkenTokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as `tokenizer` does, control slots at ids 0..999."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    with open(tokenizer.path, encoding="utf-8") as f:
        raw = json.load(f)
    num_ranks = tokenizer.vocab_size - len(tokenizer.control_tokens())
    ranks = [base64.b64decode(entry["token_bytes"]) for entry in raw["vocab"][:num_ranks]]
    vocab, merges = bpe_from_ranks(ranks)
    control = tokenizer.control_tokens()
    clashes = sorted(name for name in control if name in vocab)
    if clashes:
        raise ValueError(f"{tokenizer.path}: ordinary tokens {clashes} have the names of control tokens")
    vocab = {piece: rank + len(control) for piece, rank in vocab.items()}
    vocab.update(control)
    hf = RustTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(raw["config"]["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(name, special=True) for name in sorted(control, key=lambda name: control[name])])
    return hf


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer.json text of a LatentForge tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        return Path(tokenizer.path).read_text(encoding="utf-8")
    if isinstance(tokenizer, TekkenTokenizer):
        return tekken_to_hf(tokenizer).to_str()
    raise TypeError(f"no Hugging Face form for a {type(tokenizer).__name__}: use an HFTokenizer or tekken")


def tokenizer_config() -> dict:
    """tokenizer_config.json: bos/eos/pad, the chat control tokens and the chat template. No BOS is added by
    `tokenizer(text)`: LatentForge documents and prompts carry no automatic BOS either."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        # transformers 4 reads this name, 5 maps it to extra_special_tokens (a list there is 5-only)
        "additional_special_tokens": list(CHAT_CONTROL_TOKENS),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config() -> dict:
    """generation_config.json: stop at end of document or of a chat turn; greedy, as latentforge-generate."""
    return {
        "bos_token_id": SPECIAL_TOKENS["<s>"],
        "eos_token_id": [SPECIAL_TOKENS[name] for name in STOP_TOKENS],
        "pad_token_id": SPECIAL_TOKENS["<unk>"],
        "do_sample": False,
    }


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir) -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENIZER_FILE).write_text(hf_tokenizer_json(tokenizer), encoding="utf-8")
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    write_generation_config(out_dir)
    return out_dir


def write_generation_config(out_dir) -> Path:
    path = Path(out_dir) / GENERATION_CONFIG_FILE
    path.write_text(json.dumps(generation_config(), indent=2) + "\n")
    return path


def checkpoint_tokenizer(checkpoint, spec: Optional[str] = None) -> Optional[Tokenizer]:
    """The tokenizer a DCP checkpoint was trained with: `spec` if given, its tokenizer.json, or the tokenizer its
    config.yaml names when that is not file-based (tekken). None when nothing says."""
    checkpoint = Path(checkpoint)
    if spec:
        return load_tokenizer(spec)
    if (checkpoint / TOKENIZER_FILE).is_file():
        return HFTokenizer(str(checkpoint / TOKENIZER_FILE))
    config_file = checkpoint / "config.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        recorded = OmegaConf.select(OmegaConf.load(config_file), "data.tokenizer")
        if recorded is not None and recorded.get("kind") == "tekken":
            path = recorded.get("path")
            return TekkenTokenizer(path if path and os.path.isfile(path) else None)
    return None


def export_checkpoint_tokenizer(checkpoint, out_dir, spec: Optional[str] = None) -> Optional[Tokenizer]:
    """The tokenizer files of a checkpoint's export (generation_config.json alone when its tokenizer is unknown,
    with a warning naming the fix)."""
    tokenizer = checkpoint_tokenizer(checkpoint, spec)
    if tokenizer is None:
        import warnings

        warnings.warn(
            f"{checkpoint} records no tokenizer (no tokenizer.json, no tekken in config.yaml): the export "
            "has no tokenizer files; pass --tokenizer SPEC (e.g. tekken or path/tokenizer.json)"
        )
        write_generation_config(out_dir)
        return None
    write_hf_tokenizer(tokenizer, out_dir)
    return tokenizer
