"""lm-evaluation-harness tasks during training (`train.eval_tasks`, every `train.eval_interval` steps and at the
last step): their metrics join the step's metrics as `eval/<task>/<metric>`, so the console, metrics.jsonl and W&B
log them.

Log-likelihood tasks only (multiple choice, perplexity: `output_type` loglikelihood / multiple_choice /
loglikelihood_rolling), scored through the runner's forward on the training layout (train/eval_harness.py):
generation needs the inference engine of rl/, which train/ does not import; evaluate generation tasks on a
checkpoint with `latentforge-eval`.
"""

from __future__ import annotations

from .base import Callback


class EvalTasks(Callback):
    order = 25  # after validation, before the writers (console, JSONL, W&B) that log its metrics
    essential = True  # a collective forward on every rank

    def __init__(
        self, tasks, interval: int, tokenizer, seq_len: int, micro_batch_size: int, limit=None, include_paths=()
    ):
        self.tasks = list(tasks)
        self.interval = interval
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.limit = limit
        self.include_paths = list(include_paths)
        self.history = []  # (step, {task: {metric: value}}) of this launch

    def on_train_start(self, trainer) -> None:
        from latentforge.train.eval_harness import check_loglikelihood_tasks

        check_loglikelihood_tasks(self.tasks, self.include_paths)  # a generation task fails now, not at step N

    def on_step_end(self, trainer, metrics: dict) -> None:
        step = metrics["step"]
        if step % self.interval and step != trainer.last_step:
            return
        scores = self.measure(trainer)
        self.history.append((step, scores))
        for task, values in scores.items():
            for metric, value in values.items():
                metrics[f"eval/{task}/{metric}"] = value
        if trainer.is_metrics_rank:
            shown = ", ".join(
                f"{task} {metric} {value:.4g}" for task, values in scores.items() for metric, value in values.items()
            )
            trainer.print(f"eval step {step}: {shown}")

    def measure(self, trainer) -> dict:
        from latentforge.train import distributed as world
        from latentforge.train.eval_harness import LogLikelihoodLM, run_tasks, runner_scorer, task_metrics

        runner = trainer.runner
        micro_batches = max(1, runner.layout.pp)  # the pipeline schedule needs one micro-batch per stage
        scorer = runner_scorer(runner, self.micro_batch_size, micro_batches, self.seq_len, runner.device)
        lm = LogLikelihoodLM(scorer, self.tokenizer, max_length=self.seq_len, device=runner.device)
        was_training = [part.training for part in runner.model_parts]
        for part in runner.model_parts:
            part.eval()
        try:
            results = run_tasks(lm, self.tasks, limit=self.limit, include_paths=self.include_paths)
            # lm-eval returns the results on the process with LOCAL_RANK 0 only: every rank logs rank 0's
            scores = world.broadcast_object(task_metrics(results) if results is not None else None)
            assert scores is not None, "lm-eval returned no results on global rank 0 (LOCAL_RANK 0 there)"
            return scores
        finally:
            for part, training in zip(runner.model_parts, was_training):
                part.train(training)
