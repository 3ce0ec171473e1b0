"""Configuration of the data pipeline: the fields of the Hydra group `data` (recipes/data/*.yaml)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from latentforge.model.errors import UserError

BUILTIN_STDLIB = "builtin:stdlib"  # the embedded pretraining corpus: Python standard library sources
BUILTIN_CHAT = "builtin:arithmetic_chat"  # the embedded SFT / GRPO prompt set: generated arithmetic problems
BUILTIN_TOOL_CHAT = "builtin:tool_chat"  # generated transcripts of tool use (python tool, guess-the-number)

DEFAULT_CACHE_ENV = "LATENTFORGE_CACHE"
SPLITS = ("train", "valid", "test")


class DataConfigError(UserError, ValueError):
    """A data setting that cannot work; the message names the field and the fix."""


def default_cache_dir() -> str:
    return os.environ.get(DEFAULT_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "latentforge")


def use_persistent_compile_cache() -> str:
    """Inductor's compiled graphs in the project's cache dir (not /tmp): a restarted or resumed run, or the next
    run of the same shapes, loads them instead of compiling again (the train step's `parallel.compile`, the
    engine's `EngineConfig.compile`). An explicit TORCHINDUCTOR_CACHE_DIR wins."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(default_cache_dir(), "inductor"))


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
    path = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    os.makedirs(path, exist_ok=True)
    return path


@dataclass
class TokenizerConfig:
    """Which tokenizer: every kind puts the special tokens at the same ids (see data.tokenizer)."""

    kind: str = "bpe"  # "bpe": byte-level BPE trained on the stdlib corpus; "tekken"; "hf": a tokenizer.json
    path: Optional[str] = None  # "hf": the tokenizer.json file (a trained BPE saved next to data is one too)
    vocab_size: int = 4096  # "bpe" only; tekken is always 131072, "hf" is whatever the file holds
    train_max_mb: float = 4.0  # "bpe" only: train on the first this-many MB of the stdlib corpus


@dataclass
class DataConfig:
    """One data source description for pretraining (`kind: pretrain`) or chat fine-tuning (`kind: sft`).

    pretrain: `paths` are Megatron indexed-dataset prefixes (`<prefix>.bin/.idx`, written by
    `python -m latentforge.data.preprocess` or by Megatron-LM) or "builtin:stdlib"; `weights` blend them.
    sft: `paths` are JSONL files (`messages` or `prompt`/`completion` per line) or "builtin:arithmetic_chat".
    """

    kind: str = "pretrain"
    paths: List[str] = field(default_factory=lambda: [BUILTIN_STDLIB])
    weights: Optional[List[float]] = None  # None: proportional to each source's token count
    split: str = "98,1,1"  # train, valid, test shares of each source's documents (Megatron's split string)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # None: $LATENTFORGE_CACHE, else ~/.cache/latentforge
    seed: int = 1234
    # A new document starts after each </s>: seq_idx numbers documents so the Mamba scan and conv reset their
    # state there and attention stays inside its document. Off: seq_idx is all zeros (plain concatenation).
    reset_at_documents: bool = True
    # Drop the loss on the token that follows </s> (predicting the next document's first token from the previous
    # document, as Megatron's eod_mask_loss does). None: follow reset_at_documents.
    mask_document_end_labels: Optional[bool] = None
    num_workers: int = 2  # tokenizer processes for first-use preprocessing
    stdlib_max_mb: float = 8.0  # the embedded corpus: the first this-many MB of the stdlib's .py files
    mid_level_dataset_surplus: float = 0.005  # Megatron's blend margin; raise it if a blend reports oversampling
    # sft only
    # keep reasoning in <think>...</think>; False renders an empty <think></think>. The dataset default: an SFT
    # JSONL record's own "enable_thinking": true|false overrides it for that conversation
    enable_thinking: bool = True
    packing: bool = True  # best-fit pack several conversations per row (False: one conversation per row)
    truncation: str = "truncate"  # a conversation longer than the row: "truncate" (keep its head), "drop", "error"
    skip_bad: bool = False  # skip (and count) malformed JSONL lines instead of stopping at the first one
    synthetic_num_train: int = 20000  # builtin:arithmetic_chat sizes
    synthetic_num_heldout: int = 500

    def __post_init__(self):
        self.validate()

    @property
    def masks_document_end_labels(self) -> bool:
        if self.mask_document_end_labels is None:
            return self.reset_at_documents
        return self.mask_document_end_labels

    def validate(self) -> None:
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerConfig(**self.tokenizer)
        if self.kind not in ("pretrain", "sft"):
            raise DataConfigError(f"data.kind must be 'pretrain' or 'sft', got {self.kind!r}")
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.paths = list(self.paths)
        if not self.paths:
            raise DataConfigError(f"data.paths is empty: list sources, or use [{BUILTIN_STDLIB}] / [{BUILTIN_CHAT}]")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.paths):
                raise DataConfigError(
                    f"data.weights has {len(self.weights)} entries for {len(self.paths)} paths: "
                    "give one weight per path, or weights: null to blend by token count"
                )
            if any(w <= 0 for w in self.weights):
                raise DataConfigError(f"data.weights must all be > 0, got {self.weights}")
        split_shares(self.split)  # raises on a malformed split
        if self.truncation not in ("truncate", "drop", "error"):
            raise DataConfigError(f"data.truncation must be truncate, drop or error, got {self.truncation!r}")
        if self.num_workers < 1:
            raise DataConfigError(f"data.num_workers must be >= 1, got {self.num_workers}")
        if self.tokenizer.kind not in ("bpe", "tekken", "hf"):
            raise DataConfigError(f"data.tokenizer.kind must be bpe, tekken or hf, got {self.tokenizer.kind!r}")

    @classmethod
    def from_any(cls, cfg) -> "DataConfig":
        """A DataConfig from itself, a dict or an OmegaConf node (unknown keys are an error)."""
        from latentforge.model.schema import from_dict, plain

        if isinstance(cfg, cls):
            return cfg
        cfg = plain(cfg)
        if isinstance(cfg, dict) and isinstance(cfg.get("paths"), str):
            cfg = {**cfg, "paths": [cfg["paths"]]}  # `data.paths=file.jsonl`: one source
        return from_dict(cls, cfg, "data", DataConfigError)

    def to_dict(self) -> dict:
        return asdict(self)


def split_shares(split: str) -> List[float]:
    """'98,1,1' -> [0.98, 0.01, 0.01] (Megatron's convention: missing entries are 0)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise DataConfigError(f"data.split must be comma-separated numbers like '98,1,1', got {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataConfigError(f"data.split must be 1 to 3 non-negative numbers with a positive sum, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]
