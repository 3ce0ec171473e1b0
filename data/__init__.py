"""LatentForge data: tokenizers, Megatron indexed datasets, blended pretraining and packed SFT batches.

Importing `data` is cheap; each name below loads its module (and megatron-core, torch) on first use.
"""

import importlib

_EXPORTS = {
    "DataConfig": "data.config",
    "TokenizerConfig": "data.config",
    "Tokenizer": "data.tokenizer",
    "TokenizerMismatchError": "data.tokenizer",
    "load_tokenizer": "data.tokenizer",
    "train_bpe": "data.tokenizer",
    "SPECIAL_TOKENS": "data.tokenizer",
    "BatchLoader": "data.loader",
    "build_pretrain_loader": "data.pretrain",
    "build_sft_loader": "data.sft",
    "preprocess": "data.preprocess",
    "MalformedInputError": "data.preprocess",
    "render_chat": "data.chat",
    "render_chat_text": "data.chat",
    "check_answer": "data.synthetic",
    "synthetic_splits": "data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
