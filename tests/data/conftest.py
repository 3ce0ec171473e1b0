"""Shared fixtures for the data tests: a private cache dir, small tokenizers, Megatron-written prefixes."""

import os

import numpy as np
import pytest

from latentforge.data.config import TokenizerConfig


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Every test of the package writes its caches here, never to ~/.cache."""
    path = str(tmp_path_factory.mktemp("lf_cache"))
    old = os.environ.get("LATENTFORGE_CACHE")
    os.environ["LATENTFORGE_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("LATENTFORGE_CACHE", None)
    else:
        os.environ["LATENTFORGE_CACHE"] = old


@pytest.fixture(scope="session")
def bpe_tok(cache_dir):
    """A 1024-token BPE trained on the first 0.3 MB of the stdlib (the default recipe's recipe, smaller)."""
    from latentforge.data.tokenizer import load_tokenizer

    return load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1024, train_max_mb=0.3), cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tekken_tok():
    from latentforge.data.tokenizer import load_tokenizer

    return load_tokenizer("tekken")


@pytest.fixture(scope="session")
def bpe_pair(bpe_tok, tmp_path_factory):
    """(the BPE, transformers' AutoTokenizer on its Hugging Face export)."""
    return bpe_tok, hf_export(bpe_tok, tmp_path_factory.mktemp("bpe_export"))


@pytest.fixture(scope="session")
def tekken_pair(tekken_tok, tmp_path_factory):
    """(tekken, transformers' AutoTokenizer on its export): converted once per session (~10 s)."""
    return tekken_tok, hf_export(tekken_tok, tmp_path_factory.mktemp("tekken_export"))


def hf_export(tokenizer, path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from latentforge.data.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(tokenizer, path)
    return AutoTokenizer.from_pretrained(str(path))


def random_documents(rng, n, low, high, min_len=3, max_len=40, eod=2, tag_base=None):
    """Token documents ending in </s>; with tag_base, document k starts with the unique id tag_base + k."""
    docs = []
    for k in range(n):
        length = int(rng.integers(min_len, max_len))
        body = rng.integers(low, high, size=length - 1)
        if tag_base is not None:
            body[0] = tag_base + k
        docs.append(np.concatenate([body, [eod]]).astype(np.int64))
    return docs


def megatron_write(prefix, docs, dtype=np.uint16):
    """Write documents with megatron-core's own builder (as Megatron-LM's preprocess_data.py does)."""
    from latentforge.data.util import megatron_datasets

    indexed_dataset = megatron_datasets()[0]
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(np.asarray(d), [len(d)])
    builder.finalize(prefix + ".idx")
    return prefix
