"""A reward worker: decodes completions and scores them (task verifier or environment reward + user reward functions +
the model judge, all contained)."""

from __future__ import annotations

from typing import List

from latentforge.rl.buffer import Sample
from latentforge.rl.config import RewardConfig
from latentforge.rl.rewards import RewardResult, RewardScorer


class RewardWorker:
    def __init__(self, cfg: RewardConfig, tokenizer_spec):
        from latentforge.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.scorer = RewardScorer(cfg.functions, task_weight=cfg.task_weight)
        self.stop_texts = ("<|im_end|>", "</s>")
        self.judge = None
        if cfg.judge:
            from latentforge.rl.rewards.judge import ModelJudge

            self.judge = ModelJudge(cfg.judge)

    def decode(self, sample: Sample) -> str:
        text = self.tokenizer.decode(sample.completion_ids)
        for stop in self.stop_texts:
            if text.endswith(stop):
                text = text[: -len(stop)]
        return text

    def score(self, samples: List[Sample], records: List[dict]) -> List[Sample]:
        """Fill reward, reward_info and text of each sample (records[i] is samples[i]'s prompt record)."""
        for sample, record in zip(samples, records):
            sample.text = self.decode(sample)
            # an environment episode was scored by its environment, turn by turn: that score stands in for the
            # task's verifier, and the user functions and the judge read the whole episode
            verdict = None
            if sample.meta.get("episode"):
                if sample.reward is None:
                    raise ValueError(
                        f"episode sample {sample.group_id}/{sample.sample_index} came without its environment's "
                        "reward (rl/envs/episode.py scores every episode it finishes)"
                    )
                verdict = RewardResult(
                    sample.reward, correct=sample.reward_info.get("correct"), info=sample.reward_info
                )
            result = self.scorer.score(record, sample.text, verdict=verdict)
            sample.reward = result.score
            sample.reward_info = {"correct": result.correct, **result.info}
        if self.judge is not None:
            add_judge_scores(self.judge, list(zip(samples, records)))
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
