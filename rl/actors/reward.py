"""A reward worker: decodes completions and scores them (task verifier + user reward functions, all contained)."""

from __future__ import annotations

from typing import List

from latentforge.rl.buffer import Sample
from latentforge.rl.config import RewardConfig
from latentforge.rl.rewards import RewardScorer


class RewardWorker:
    def __init__(self, cfg: RewardConfig, tokenizer_spec):
        from latentforge.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.scorer = RewardScorer(cfg.functions, task_weight=cfg.task_weight)
        self.stop_texts = ("<|im_end|>", "</s>")
        self.judge = None
        if cfg.judge:
            from latentforge.rl.rewards.judge import JudgeConfig, ModelJudge

            self.judge = ModelJudge(JudgeConfig(**cfg.judge))

    def decode(self, sample: Sample) -> str:
        text = self.tokenizer.decode(sample.completion_ids)
        for stop in self.stop_texts:
            if text.endswith(stop):
                text = text[: -len(stop)]
        return text

    def score(self, samples: List[Sample], records: List[dict]) -> List[Sample]:
        """Fill reward, reward_info and text of each sample (records[i] is samples[i]'s prompt record)."""
        for sample, record in zip(samples, records):
            if sample.meta.get("episode"):
                continue  # an environment episode: its environment scored it, turn by turn
            sample.text = self.decode(sample)
            result = self.scorer.score(record, sample.text)
            sample.reward = result.score
            sample.reward_info = {"correct": result.correct, **result.info}
        if self.judge is not None:
            add_judge_scores(self.judge, [(s, r) for s, r in zip(samples, records) if not s.meta.get("episode")])
        return samples

    def close(self):
        self.scorer.close()


def add_judge_scores(judge, pairs) -> None:
    """Add the judge's weighted score to each (sample, record), batched through the judge's engine."""
    verdicts = judge.judge([(record, sample.text) for sample, record in pairs])
    for (sample, _), verdict in zip(pairs, verdicts):
        sample.reward += judge.cfg.weight * verdict.score
        info = sample.reward_info
        info.setdefault("components", {})["judge"] = verdict.score
        failures = verdict.info.pop("failures", [])
        if failures:
            info.setdefault("failures", []).extend(failures)
        info.update(verdict.info)
