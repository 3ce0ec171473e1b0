"""LatentForge data: tokenizers, Megatron indexed datasets, blended pretraining and packed SFT batches.

Importing `data` is cheap; each name below loads its module (and megatron-core, torch) on first use.
"""

import importlib

_EXPORTS = {
    "DataConfig": "latentforge.data.config",
    "TokenizerConfig": "latentforge.data.config",
    "Tokenizer": "latentforge.data.tokenizer",
    "TokenizerMismatchError": "latentforge.data.tokenizer",
    "load_tokenizer": "latentforge.data.tokenizer",
    "train_bpe": "latentforge.data.tokenizer",
    "SPECIAL_TOKENS": "latentforge.data.tokenizer",
    "BatchLoader": "latentforge.data.loader",
    "build_pretrain_loader": "latentforge.data.pretrain",
    "build_sft_loader": "latentforge.data.sft",
    "preprocess": "latentforge.data.preprocess",
    "MalformedInputError": "latentforge.data.preprocess",
    "render_chat": "latentforge.data.chat",
    "render_chat_text": "latentforge.data.chat",
    "check_answer": "latentforge.data.synthetic",
    "synthetic_splits": "latentforge.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
