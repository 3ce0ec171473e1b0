"""A model judge: rewards from a judge model's verdict, for tasks without a verifier.

The reward worker renders each (record, completion) into a rubric prompt (a user turn of the chat template), runs
all of a batch through the generation engine (`model.engine.Engine`, continuous batching, greedy by default), and
parses the last "Score: N" of each verdict: reward = N / max_score. A verdict without a score, with one outside
[0, max_score], a prompt too long for the judge, or one not finished within `timeout_s` (the batch's deadline:
what is left is aborted) scores 0 and is reported as a failure (status unparsable | too_long | timeout), like a
failing reward function: counted, logged, never a crash.

Configured as `rl.reward.judge` ({checkpoint: <Hugging Face dir or DCP run dir>, weight: 1.0, ...}); the judge's
reward is added to the task's and the reward functions' with its weight (task_weight: 0 for judge-only tasks).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, List, Optional, Sequence, Tuple

from latentforge.model.engine.config import EngineConfig, SamplingParams

from .base import RewardResult, answer_section

if TYPE_CHECKING:
    from latentforge.data.tokenizer import Tokenizer

DEFAULT_RUBRIC = (
    "You are grading an answer.\nQuestion: {question}\nReference answer: {reference}\n"
    "Answer to grade: {response}\nHow correct and helpful is the answer, from 0 to {max_score}? "
    "Reply with 'Score: <number>'."
)
_SCORE_RE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def judge_sampling() -> SamplingParams:
    """Greedy verdicts (the same answer gets the same score); a "Score: N" line needs few tokens."""
    return SamplingParams(temperature=0.0, max_new_tokens=64)


def judge_engine() -> EngineConfig:
    """A batch of verdicts is one reward worker's samples: wider than a rollout worker's default slots."""
    return EngineConfig(max_batch=16)


@dataclass
class JudgeConfig:
    # keys of the flat layout before the nested sampling / engine configs, named in the unknown-key error
    MOVED_KEYS: ClassVar[dict] = {
        **{k: f"sampling.{k}" for k in ("temperature", "max_new_tokens")},
        **{k: f"engine.{k}" for k in ("max_batch", "max_seq_len")},
    }

    checkpoint: str = ""  # the judge model: a Hugging Face directory or a DCP checkpoint / run directory
    tokenizer: str = ""  # default: the checkpoint's tokenizer.json
    rubric: str = DEFAULT_RUBRIC  # fields: {question} {reference} {response} {max_score}
    weight: float = 1.0
    max_score: float = 10.0
    # how verdicts are drawn (temperature, max_new_tokens, ...; the chat end tokens are always stops): a partial
    # mapping keeps the rest of judge_sampling()
    sampling: SamplingParams = field(default_factory=judge_sampling)
    # the judge's generation engine (max_batch slots, max_seq_len = rubric prompt + verdict, draft_tokens...)
    engine: EngineConfig = field(default_factory=judge_engine)
    enable_thinking: bool = False
    timeout_s: float = 120.0  # one batch of verdicts
    device: str = "cpu"

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError(
                "rl.reward.judge.checkpoint is required: the judge model's Hugging Face directory or DCP run directory"
            )
        if self.max_score <= 0 or self.timeout_s <= 0:
            raise ValueError(
                f"rl.reward.judge: max_score ({self.max_score}) and timeout_s ({self.timeout_s}) must be > 0"
            )
        for field_name in ("question", "response"):
            if "{" + field_name + "}" not in self.rubric:
                raise ValueError(f"rl.reward.judge.rubric must contain {{{field_name}}}")


def parse_score(text: str, max_score: float) -> Optional[float]:
    """The last 'Score: N' of a verdict, or None when there is none or it is outside [0, max_score]."""
    matches = _SCORE_RE.findall(text.rsplit("</think>", 1)[-1])
    if not matches:
        return None
    value = float(matches[-1])
    return value if 0 <= value <= max_score else None


def rubric_question(record: dict) -> str:
    users = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users else str(record.get("question", ""))


class ModelJudge:
    def __init__(self, cfg: JudgeConfig, model=None, tokenizer: Optional[Tokenizer] = None):
        from latentforge.model.engine import Engine

        self.cfg = cfg
        if model is None:
            from latentforge.rl.generate import load_model, load_tokenizer_for

            model = load_model(cfg.checkpoint, cfg.device)
            tokenizer = tokenizer or load_tokenizer_for(cfg.checkpoint, cfg.tokenizer)
        elif tokenizer is None:
            raise ValueError("ModelJudge(model=...) needs that model's tokenizer as well (tokenizer=...)")
        self.tokenizer: Tokenizer = tokenizer
        self.engine = Engine(model, cfg.engine)

    def prompt_ids(self, record: dict, completion: str) -> List[int]:
        text = self.cfg.rubric.format(
            question=rubric_question(record),
            reference=record.get("answer", "none"),
            response=answer_section(record, completion).strip(),
            max_score=f"{self.cfg.max_score:g}",
        )
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], enable_thinking=self.cfg.enable_thinking, add_generation_prompt=True
        )

    def judge(self, items: Sequence[Tuple[dict, str]]) -> List[RewardResult]:
        """One RewardResult per (record, completion), in order; info holds the verdict or the failure."""
        cfg = self.cfg
        stops = (*cfg.sampling.stop_token_ids, self.tokenizer.im_end_id, self.tokenizer.eod_id)
        params = replace(cfg.sampling, stop_token_ids=stops)
        max_new_tokens, max_seq_len = params.max_new_tokens, cfg.engine.max_seq_len
        results: List[Optional[RewardResult]] = [None] * len(items)
        pending = set()
        for i, (record, completion) in enumerate(items):
            ids = self.prompt_ids(record, completion)
            if len(ids) + max_new_tokens > max_seq_len:
                results[i] = _failed(
                    "too_long",
                    f"rubric prompt of {len(ids)} tokens + sampling.max_new_tokens "
                    f"{max_new_tokens} > judge engine.max_seq_len {max_seq_len}",
                )
                continue
            self.engine.add_request(ids, params, request_id=i)
            pending.add(i)
        deadline = time.monotonic() + cfg.timeout_s
        while self.engine.has_unfinished():
            if time.monotonic() > deadline:
                for i in pending:
                    self.engine.abort(i)
            for out in self.engine.step():
                pending.discard(out.request_id)
                results[out.request_id] = self._verdict(out)
        verdicts = [r for r in results if r is not None]
        assert len(verdicts) == len(items), "every request ends in a verdict (an aborted one too)"
        return verdicts

    def _verdict(self, out) -> RewardResult:
        if out.finish_reason == "abort":
            return _failed("timeout", f"no verdict within rl.reward.judge.timeout_s={self.cfg.timeout_s}")
        text = self.tokenizer.decode(
            [t for t in out.token_ids if t not in (self.tokenizer.im_end_id, self.tokenizer.eod_id)]
        )
        value = parse_score(text, self.cfg.max_score)
        if value is None:
            return _failed("unparsable", f"no 'Score: N' in [0, {self.cfg.max_score:g}] in the verdict {text[-200:]!r}")
        return RewardResult(value / self.cfg.max_score, info={"judge_score": value, "judge_verdict": text[-200:]})


def _failed(status: str, message: str) -> RewardResult:
    return RewardResult(0.0, info={"failures": [{"function": "judge", "status": status, "message": message}]})
