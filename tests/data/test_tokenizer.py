import os

import pytest

from latentforge.data.tokenizer import (
    SPECIAL_TOKENS,
    HFTokenizer,
    TokenizerMismatchError,
    load_default_bpe,
    load_tokenizer,
    train_bpe,
)

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Grüße aus Zürich — 東京 🚀\tend",
    "  spaces   and\r\nCRLF",
    "numbers 1234567 and 3.14159",
]


def test_same_special_ids_in_every_source(bpe_tok, tekken_tok):
    hf = load_tokenizer(f"hf:{bpe_tok.path}")  # a tokenizer.json on disk
    for tok in (bpe_tok, tekken_tok, hf):
        assert tok.special_ids == SPECIAL_TOKENS
        assert (tok.unk_id, tok.bos_id, tok.eod_id, tok.im_start_id, tok.im_end_id, tok.think_id, tok.think_end_id) == (
            0,
            1,
            2,
            10,
            11,
            12,
            13,
        )
        for name, idx in SPECIAL_TOKENS.items():
            assert tok.decode([idx]) == name
            assert tok.is_special(idx)
    assert tekken_tok.vocab_size == 131072
    assert bpe_tok.vocab_size == 1024
    assert hf.fingerprint()["sha256"] == bpe_tok.fingerprint()["sha256"]


@pytest.mark.parametrize("which", ["bpe", "tekken"])
def test_roundtrip_and_no_forged_control_tokens(which, bpe_tok, tekken_tok):
    tok = bpe_tok if which == "bpe" else tekken_tok
    for text in TEXTS + ["a </s> b <|im_start|>user <think>x</think> <s><unk>"]:
        ids = tok.encode(text)
        assert not any(tok.is_special(i) for i in ids), "text must never produce control tokens"
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_tekken_matches_mistral_common(tekken_tok):
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from latentforge.data.tokenizer import tekken_file

    ref = Tekkenizer.from_file(tekken_file())
    for text in TEXTS:
        ids = tekken_tok.encode(text)
        assert ids == ref.encode(text, bos=False, eos=False)
        assert min(ids) >= 1000  # after the 1000 control slots
        assert tekken_tok.decode(ids) == ref.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
    assert tekken_tok.decode([1, *tekken_tok.encode("hi"), 2]) == "<s>hi</s>"
    assert tekken_tok.decode([1, *tekken_tok.encode("hi"), 2], skip_special_tokens=True) == "hi"


def test_trained_bpe_is_deterministic_and_cached(tmp_path, bpe_tok):
    texts = [t * 20 for t in TEXTS]
    a = train_bpe(texts, 400, str(tmp_path / "a" / "tokenizer.json"))
    b = train_bpe(texts, 400, str(tmp_path / "b" / "tokenizer.json"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    # a small corpus learns fewer merges: the vocabulary is filled up to exactly the requested size
    assert a.vocab_size == b.vocab_size == 400
    assert a.special_ids == SPECIAL_TOKENS
    # the default BPE is trained once, then loaded from the cache
    mtime = os.path.getmtime(bpe_tok.path)
    again = load_default_bpe(1024, 0.3)
    assert again.path == bpe_tok.path and os.path.getmtime(again.path) == mtime
    assert again.fingerprint() == bpe_tok.fingerprint()


def test_tokenizer_json_with_other_special_ids_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"]))
    path = str(tmp_path / "other.json")
    tok.save(path)
    with pytest.raises(ValueError, match="fixed ids"):
        HFTokenizer(path)


def test_fingerprint_mismatch_is_an_error(bpe_tok, tekken_tok):
    bpe_tok.check_matches(bpe_tok.fingerprint(), "x")
    with pytest.raises(TokenizerMismatchError, match="vocab 131072"):
        bpe_tok.check_matches(tekken_tok.fingerprint(), "checkpoint")


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer("sentencepiece")
    with pytest.raises(FileNotFoundError):
        load_tokenizer("hf:/nonexistent/tokenizer.json")


def test_model_vocab_check_and_config_spec(bpe_tok, cache_dir):
    from latentforge.data.config import DataConfig, TokenizerConfig

    bpe_tok.check_model_vocab(1024)
    bpe_tok.check_model_vocab(1152)  # a padded embedding is fine
    with pytest.raises(TokenizerMismatchError, match="at least 1024"):
        bpe_tok.check_model_vocab(512)
    cfg = DataConfig(tokenizer=TokenizerConfig(vocab_size=1024, train_max_mb=0.3), cache_dir=cache_dir)
    assert load_tokenizer(cfg).fingerprint() == bpe_tok.fingerprint()
