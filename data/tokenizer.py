"""Tokenizers: one interface, three sources, the same special-token ids everywhere (SPEC section 7).

- `HFTokenizer`: a Hugging Face `tokenizer.json` (the released model's, or a BPE we trained);
- `TekkenTokenizer`: the 131,072-entry Tekken vocabulary shipped by `mistral-common` (1,000 special slots,
  then byte-level BPE ranks), fully offline;
- a byte-level BPE trained with `tokenizers` on the stdlib corpus (`train_bpe`), cached, loaded as an HFTokenizer.

Text is always encoded as plain text: a literal "</s>" or "<|im_start|>" inside a document becomes ordinary
tokens, never a control token, so data can not forge document boundaries or chat turns.

One tokenization of control-token text, the same in LatentForge and in a Hugging Face export (data/hf_tokenizer.py):
    data, message content          encode(text)                      tokenizer(text, split_special_tokens=True)
    a chat (encode_chat_text for   apply_chat_template(messages)     apply_chat_template(messages,
    its message text)                                                    sanitize_control_tokens=True)
    a prompt string typed with     encode_with_control_tokens(text)  tokenizer(text)  (transformers' default)
    control-token names
The two columns give identical ids (tests/data/test_hf_tokenizer.py); a chat without control-token text in its
messages gives the same ids under transformers' default apply_chat_template too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from typing import Iterable, List, Optional, Sequence, Union

from latentforge.data.config import DataConfig, TokenizerConfig, resolve_cache_dir
from latentforge.model.errors import UserError

SPECIAL_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 10, "<|im_end|>": 11, "<think>": 12, "</think>": 13}
BPE_NUM_RESERVED = 16  # ids 0..15 are control tokens in a trained BPE (Tekken reserves 1000)
TEKKEN_VOCAB_SIZE = 131072
TEKKEN_FILE = "tekken_240911.json"
BPE_FORMAT_VERSION = 1  # bump when train_bpe changes what it produces (it is part of the cache key)
# Tekken's pre-tokenizer regex (SPEC section 7), reused for the trained BPE so both split text alike.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerMismatchError(UserError, ValueError):
    """Data or a checkpoint was made with another tokenizer than the one in use."""


def _reserved_name(i: int) -> str:
    for name, idx in SPECIAL_TOKENS.items():
        if idx == i:
            return name
    return f"<SPECIAL_{i}>"


class Tokenizer(ABC):
    """encode / decode / vocab size / special ids / chat template, whatever the source."""

    unk_id = SPECIAL_TOKENS["<unk>"]
    bos_id = SPECIAL_TOKENS["<s>"]
    eod_id = SPECIAL_TOKENS["</s>"]
    im_start_id = SPECIAL_TOKENS["<|im_start|>"]
    im_end_id = SPECIAL_TOKENS["<|im_end|>"]
    think_id = SPECIAL_TOKENS["<think>"]
    think_end_id = SPECIAL_TOKENS["</think>"]
    special_ids = dict(SPECIAL_TOKENS)

    kind: str
    spec: str  # load_tokenizer(spec) rebuilds this tokenizer (used by worker processes)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows the embedding needs: every id the tokenizer can produce is below this."""

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Plain text to ids: no BOS/EOS added, control tokens never produced."""

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def control_tokens(self) -> dict:
        """{name: id} of every control token: what a Hugging Face export marks as special."""
        return dict(SPECIAL_TOKENS)

    def encode_with_control_tokens(self, text: str) -> List[int]:
        """Text in which control-token names are control tokens ("a </s> b" -> [..., 2, ...]), the rest plain
        text: how transformers' `tokenizer(text)` reads a prompt. Never used for data (see the module docstring)."""
        control = self.control_tokens()
        return [
            i
            for piece, is_name in self._split_at_control_names(text)
            for i in ([control[piece]] if is_name else self.encode(piece))
        ]

    def encode_chat_text(self, text: str) -> List[int]:
        """Message text of a chat: plain text, with each control-token name in it encoded as text on its own, as
        transformers' `apply_chat_template(..., sanitize_control_tokens=True)` does ("a </s> b" -> "a ", "</s>",
        " b"), so a message can not forge a turn and both worlds give the same ids."""
        return [i for piece, _ in self._split_at_control_names(text) for i in self.encode(piece)]

    def _split_at_control_names(self, text: str) -> List[tuple]:
        """[(piece, is a control-token name)], matched leftmost-longest as Hugging Face matches added tokens."""
        if not hasattr(self, "_control_re"):
            names = sorted(self.control_tokens(), key=len, reverse=True)
            self._control_re = re.compile("|".join(re.escape(n) for n in names))
        pieces, start = [], 0
        for match in self._control_re.finditer(text):
            if match.start() > start:
                pieces.append((text[start : match.start()], False))
            pieces.append((match.group(), True))
            start = match.end()
        if start < len(text):
            pieces.append((text[start:], False))
        return pieces

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids to text; control tokens render as their names unless skipped."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """True for control-token ids (the reserved range)."""

    @abstractmethod
    def _content_hash(self) -> str:
        """sha256 of what decides the token ids (vocabulary, merges, special tokens)."""

    def fingerprint(self) -> dict:
        """What a checkpoint or a dataset records to refuse a different tokenizer later."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = {"kind": self.kind, "vocab_size": int(self.vocab_size), "sha256": self._content_hash()}
        return dict(self._fingerprint)

    def check_matches(self, recorded: dict, what: str) -> None:
        """Raise TokenizerMismatchError if `recorded` (a fingerprint) is not this tokenizer."""
        mine = self.fingerprint()
        if recorded.get("vocab_size") != mine["vocab_size"] or recorded.get("sha256") != mine["sha256"]:
            raise TokenizerMismatchError(
                f"{what} was made with tokenizer {recorded.get('kind')} (vocab {recorded.get('vocab_size')}, "
                f"sha256 {str(recorded.get('sha256'))[:12]}) but the tokenizer in use is {mine['kind']} "
                f"(vocab {mine['vocab_size']}, sha256 {mine['sha256'][:12]}). Use the same tokenizer, or "
                f"re-tokenize the data / start from a checkpoint made with this one."
            )

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise unless a model with this many embedding rows can take every id of this tokenizer."""
        if model_vocab_size < self.vocab_size:
            raise TokenizerMismatchError(
                f"the model has {model_vocab_size} vocabulary rows but tokenizer {self.kind} produces ids up to "
                f"{self.vocab_size - 1}: set the model's vocab_size to at least {self.vocab_size} (or pick a "
                f"smaller tokenizer, e.g. data.tokenizer.vocab_size={model_vocab_size} for the trained BPE)"
            )

    def apply_chat_template(
        self, messages, *, enable_thinking: bool = True, add_generation_prompt: bool = False
    ) -> List[int]:
        """ChatML ids for a conversation (see data.chat for the exact layout)."""
        from latentforge.data.chat import render_chat

        return render_chat(
            self, messages, enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt
        ).ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, spec={self.spec!r})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json whose control tokens sit at LatentForge's ids."""

    def __init__(self, path: str, kind: str = "hf", vocab_size: Optional[int] = None):
        from tokenizers import Tokenizer as RustTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a Hugging Face tokenizer.json)")
        self.path = os.path.abspath(path)
        self.kind = kind
        self.spec = f"hf:{self.path}"
        self._tok = RustTokenizer.from_file(self.path)
        # Added (special) tokens found in raw text are encoded as ordinary text instead.
        self._tok.encode_special_tokens = True
        wrong = {
            name: self._tok.token_to_id(name)
            for name, idx in SPECIAL_TOKENS.items()
            if self._tok.token_to_id(name) != idx
        }
        if wrong:
            raise ValueError(
                f"{path}: LatentForge needs the control tokens at fixed ids {SPECIAL_TOKENS}, but this tokenizer has "
                f"{wrong} (token -> its id here). Use a tokenizer with these ids (the Nemotron-H tokenizer.json, "
                f"'tekken', or a BPE from data.tokenizer.train_bpe)."
            )
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        actual = self._tok.get_vocab_size(with_added_tokens=True)
        self._vocab_size = max(actual, vocab_size or 0)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def control_tokens(self) -> dict:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _content_hash(self) -> str:
        # Vocabulary, merges and added tokens decide the ids; the rest of the JSON layout varies between
        # `tokenizers` versions and must not make the same tokenizer look different.
        data = json.loads(self._tok.to_str())
        model = data.get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or []]
        content = {
            "type": model.get("type"),
            "vocab": sorted((model.get("vocab") or {}).items())
            if isinstance(model.get("vocab"), dict)
            else model.get("vocab"),
            "merges": merges,
            "added": sorted((t["id"], t["content"]) for t in data.get("added_tokens", [])),
            "vocab_size": self._vocab_size,
        }
        return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


class TekkenTokenizer(Tokenizer):
    """mistral-common's Tekken vocabulary (131,072 ids: 1,000 control slots, then BPE ranks)."""

    kind = "tekken"

    def __init__(self, path: Optional[str] = None):
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self.path = path or tekken_file()
        self.spec = "tekken" if path is None else f"tekken:{self.path}"
        self._tk = Tekkenizer.from_file(self.path)
        self._ignore = SpecialTokenPolicy.IGNORE
        self._num_special = self._tk.num_special_tokens
        if self._tk.n_words != TEKKEN_VOCAB_SIZE or self._num_special <= max(SPECIAL_TOKENS.values()):
            raise ValueError(
                f"{self.path}: expected a Tekken file with {TEKKEN_VOCAB_SIZE} ids and at least 16 "
                f"control slots, got {self._tk.n_words} ids and {self._num_special} slots"
            )

    @property
    def vocab_size(self) -> int:
        return self._tk.n_words

    def encode(self, text: str) -> List[int]:
        # Tekkenizer.encode treats the text as plain text (control-token names are not parsed).
        return self._tk.encode(text, bos=False, eos=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        pieces, run = [], []
        for i in ids:
            i = int(i)
            if i < self._num_special:
                if run:
                    pieces.append(self._tk.decode(run, special_token_policy=self._ignore))
                    run = []
                if not skip_special_tokens:
                    pieces.append(_reserved_name(i))
            else:
                run.append(i)
        if run:
            pieces.append(self._tk.decode(run, special_token_policy=self._ignore))
        return "".join(pieces)

    def is_special(self, token_id: int) -> bool:
        return 0 <= int(token_id) < self._num_special

    def control_tokens(self) -> dict:
        return {_reserved_name(i): i for i in range(self._num_special)}

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        h.update(json.dumps(SPECIAL_TOKENS, sort_keys=True).encode())
        return h.hexdigest()


def tekken_file() -> str:
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", TEKKEN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the installed mistral-common does not ship {TEKKEN_FILE}; install mistral-common>=1.5"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Trained byte-level BPE


def bpe_special_tokens() -> List[str]:
    return [_reserved_name(i) for i in range(BPE_NUM_RESERVED)]


def train_bpe(texts: Iterable[str], vocab_size: int, save_path: str) -> HFTokenizer:
    """Train a byte-level BPE (Tekken pre-tokenizer regex) with ids 0..15 reserved for control tokens.

    Deterministic for the same texts. If the corpus is too small to learn `vocab_size` tokens, the vocabulary is
    filled up with unused control tokens so the size is exactly what was asked for (the embedding size).
    Written to a temporary name and renamed, so concurrent or interrupted runs never leave a partial file.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    if vocab_size < BPE_NUM_RESERVED + 256:
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= {BPE_NUM_RESERVED + 256} (16 control ids and 256 "
            f"bytes), got {vocab_size}"
        )
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=bpe_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        start = tok.get_vocab_size(with_added_tokens=True)
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(f"<UNUSED_{start + k}>", special=True) for k in range(missing)])
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    tmp = f"{save_path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, save_path)
    return HFTokenizer(save_path, kind="bpe")


def default_bpe_path(vocab_size: int, train_max_mb: float, cache_dir: Optional[str] = None) -> str:
    from latentforge.data.stdlib_corpus import corpus_key

    key = f"v{BPE_FORMAT_VERSION}-{corpus_key(train_max_mb)}"
    return os.path.join(resolve_cache_dir(cache_dir), "tokenizers", f"bpe{vocab_size}-{key}", "tokenizer.json")


def load_default_bpe(vocab_size: int = 4096, train_max_mb: float = 4.0, cache_dir: Optional[str] = None) -> HFTokenizer:
    """The tiny recipes' tokenizer: trained on the first `train_max_mb` MB of the stdlib on first use, cached."""
    from latentforge.data.stdlib_corpus import iter_stdlib_texts
    from latentforge.data.util import file_lock

    path = default_bpe_path(vocab_size, train_max_mb, cache_dir)
    if not os.path.isfile(path):
        with file_lock(path + ".lock"):
            if not os.path.isfile(path):
                train_bpe(iter_stdlib_texts(train_max_mb), vocab_size, path)
    return HFTokenizer(path, kind="bpe")


# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(
    spec: Union[str, TokenizerConfig, DataConfig, dict, None] = None, cache_dir: Optional[str] = None
) -> Tokenizer:
    """A tokenizer from a spec.

    str: "tekken" | "tekken:<file>" | "bpe" | "bpe:<vocab_size>" | "hf:<tokenizer.json>" | "<path>/tokenizer.json"
    TokenizerConfig (or its dict): kind bpe / tekken / hf as documented there. None: the default BPE (4096).
    A DataConfig: its tokenizer, with its cache_dir.
    """
    if isinstance(spec, DataConfig):
        spec, cache_dir = spec.tokenizer, cache_dir or spec.cache_dir
    if spec is None:
        spec = TokenizerConfig()
    if isinstance(spec, dict):
        spec = TokenizerConfig(**spec)
    if isinstance(spec, TokenizerConfig):
        if spec.kind == "tekken":
            return TekkenTokenizer(spec.path)
        if spec.kind == "hf":
            if not spec.path:
                raise ValueError("tokenizer.kind=hf needs tokenizer.path (a tokenizer.json file)")
            return HFTokenizer(spec.path)
        if spec.kind == "bpe":
            if spec.path:  # a BPE trained earlier and saved next to its data
                return HFTokenizer(spec.path, kind="bpe")
            return load_default_bpe(spec.vocab_size, spec.train_max_mb, cache_dir)
        raise ValueError(f"unknown tokenizer kind {spec.kind!r}: use bpe, tekken or hf")
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer spec must be a str, TokenizerConfig or dict, got {type(spec).__name__}")
    if spec == "tekken":
        return TekkenTokenizer()
    if spec.startswith("tekken:"):
        return TekkenTokenizer(spec[len("tekken:") :])
    if spec == "bpe":
        return load_default_bpe(cache_dir=cache_dir)
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[len("bpe:") :])
        except ValueError:
            raise ValueError(f"tokenizer spec {spec!r}: expected bpe:<vocab_size>, e.g. bpe:4096") from None
        return load_default_bpe(vocab, cache_dir=cache_dir)
    if spec.startswith("hf:"):
        return HFTokenizer(spec[len("hf:") :])
    if spec.endswith(".json") or os.path.isfile(spec):
        return HFTokenizer(spec)
    raise ValueError(
        f"unknown tokenizer spec {spec!r}: use tekken, bpe, bpe:<vocab>, hf:<tokenizer.json> "
        "or a path to a tokenizer.json"
    )
