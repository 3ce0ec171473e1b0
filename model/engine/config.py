"""What a request asks for (`SamplingParams`), what the engine is sized for (`EngineConfig`), what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

WEIGHT_UPDATE_POLICIES = ("continue", "recompute")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus; 1 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_token_ids: Sequence[int] = ()  # generation ends after emitting one of these (it is kept in the output)
    seed: Optional[int] = None  # None: derived from the engine's seed and the request number
    return_logits: bool = False  # keep the main model's raw logits of every generated token (tests, distillation)

    def __post_init__(self):
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class EngineConfig:
    max_batch: int = 8  # slots: sequences decoded together; more requests wait and join as slots free up
    max_seq_len: int = 2048  # prompt + new tokens of one sequence
    draft_tokens: int = 0  # k tokens drafted by the MTP block per step; 0 = plain decoding
    draft_gate: bool = False  # draft only while measured to pay (model/engine/gate.py); greedy output is unchanged
    draft_probe_interval: int = 64  # gated: steps between probes of the mode not in use
    weight_update_policy: str = "continue"  # default of update_weights: "continue" or "recompute" the caches
    prefix_cache_size: int = 8  # prompts whose prefill states are kept for reuse (keyed by weight version)
    seed: int = 0  # seeds requests that bring none
    # rollout routing replay (R3): keep the experts each trunk MoE layer chose for every token the main model
    # consumed (GenerationResult.routes); off = decoding pays nothing
    record_routes: bool = False
    # torch.compile (inductor, dynamic shapes) the decode / verify step's forward: fewer Python/per-op overheads per
    # token, at a compile cost of minutes on CPU the first time (inductor's cache in the project cache dir keeps
    # it for the next runs); prefill and the MTP block stay eager. See bench/RESULTS.md for where it pays
    compile: bool = False

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"EngineConfig.max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq_len < 2:
            raise ValueError(f"EngineConfig.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.draft_tokens < 0:
            raise ValueError(f"EngineConfig.draft_tokens must be >= 0, got {self.draft_tokens}")
        if self.draft_probe_interval < 1:
            raise ValueError(f"EngineConfig.draft_probe_interval must be >= 1, got {self.draft_probe_interval}")
        if self.weight_update_policy not in WEIGHT_UPDATE_POLICIES:
            raise ValueError(
                f"EngineConfig.weight_update_policy must be one of {WEIGHT_UPDATE_POLICIES}, "
                f"got {self.weight_update_policy!r}"
            )
        if self.prefix_cache_size < 0:
            raise ValueError(f"EngineConfig.prefix_cache_size must be >= 0, got {self.prefix_cache_size}")


@dataclass
class GenerationResult:
    request_id: Any
    prompt_ids: list
    token_ids: list = field(default_factory=list)
    # log-probability of each token under the distribution it was sampled from (temperature, top-k, top-p
    # applied); for greedy requests, under the model's plain softmax (temperature 1)
    logprobs: list = field(default_factory=list)
    versions: list = field(default_factory=list)  # weight version of the forward that produced each token
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    logits: Optional[torch.Tensor] = None  # (tokens, V) fp32, when SamplingParams.return_logits
    # EngineConfig.record_routes: (prompt + generated - 1, trunk MoE layers, top_k) int64 expert ids of every token
    # the main model consumed (all but the last generated one, which no forward reads), under the latest weights
    # for "recompute" updates; with drafting, only accepted tokens' routes
    routes: Optional[torch.Tensor] = None


@dataclass
class EngineStats:
    """Counters since construction (or reset). Drafting: per depth j, how many rows drafted j tokens and how
    many had their j-th draft accepted."""

    steps: int = 0
    prefill_tokens: int = 0
    prefix_hits: int = 0
    generated_tokens: int = 0
    verify_rows: int = 0  # (row, verify step) pairs
    verify_tokens: int = 0  # tokens those verify steps produced (accepted drafts + 1), before stop/length cuts
    drafted: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    undrafted_steps: int = 0  # steps decoded plainly because the draft gate had drafting off
    draft_on: Optional[bool] = None  # the last step's mode under the draft gate (None: no gate)
    expected_draft_speedup: Optional[float] = None  # the gate's estimate after the last step

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step per row: accepted drafts + the correction/bonus token (1.0 = no gain)."""
        return self.verify_tokens / self.verify_rows if self.verify_rows else 0.0

    @property
    def acceptance_rate(self) -> list:
        """Per depth: P(draft j accepted | drafts 1..j-1 accepted) is accepted[j]/accepted[j-1]; this is the
        unconditional share accepted[j] / drafted[j]."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]
