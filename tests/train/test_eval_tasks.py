"""Periodic lm-eval during training (`train.eval_tasks`): the runner's scoring hook gives the log-likelihoods and
greedy flags of a plain forward of the same model (float32) on one process and under data + context parallelism
(2 gloo processes), the callback logs eval/<task>/<metric> at its interval and at the last step, and generation
tasks or bad settings are refused with one line naming the fix."""

import math

import pytest
import torch

from latentforge.train.config import TrainConfig, TrainConfigError
from tests.distributed import run_distributed

from .test_parallel_common import one_thread, tiny_config

pytest.importorskip("lm_eval")

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

SEQ_LEN = 64
VOCAB = 512


def requests():
    """(context, continuation) id pairs of varied lengths, one longer than the window (left-truncated)."""
    g = torch.Generator().manual_seed(3)
    lengths = [(5, 1), (12, 3), (1, 7), (30, 2), (70, 4), (9, 9), (3, 1)]
    return [
        (torch.randint(16, VOCAB, (c,), generator=g).tolist(), torch.randint(16, VOCAB, (n,), generator=g).tolist())
        for c, n in lengths
    ]


def build(parallel=None):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config(mtp_depths=0, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = HybridModel(cfg).eval()
    reference = HybridModel(cfg).eval()
    reference.load_state_dict(model.state_dict())
    return reference, build_runner(model, cfg, ParallelConfig(**(parallel or {})))


def _scores(rank, world_size, parallel, tokenizer_path=None):
    """The runner scorer's results; with a tokenizer also the callback's logged metrics at the last step."""
    from latentforge.train.eval_harness import runner_scorer

    _, runner = build(parallel)
    scores = runner_scorer(runner, micro_batch_size=2, micro_batches=1, seq_len=SEQ_LEN, device=runner.device)(
        requests(), SEQ_LEN
    )
    if tokenizer_path is None:
        return scores
    from latentforge.data.tokenizer import HFTokenizer
    from latentforge.train.callbacks.eval_tasks import EvalTasks

    callback = EvalTasks(
        ["lf_choice"], interval=2, tokenizer=HFTokenizer(tokenizer_path), seq_len=SEQ_LEN, micro_batch_size=2, limit=4
    )
    metrics = {"step": 2}
    callback.on_step_end(FakeTrainer(runner, last_step=2, metrics_rank=rank == 0), metrics)
    return scores, metrics


def expected_scores():
    from latentforge.train.eval_harness import model_scorer

    reference, _ = build()
    return model_scorer(reference, batch_size=3, device="cpu")(requests(), SEQ_LEN)


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, expected):
        assert math.isclose(lp, lp_ref, rel_tol=1e-5, abs_tol=1e-4) and greedy == greedy_ref, (lp, lp_ref)


def test_runner_scoring_equals_a_plain_forward():
    expected = expected_scores()
    assert_same(_scores(0, 1, {}), expected)
    assert any(greedy for _, greedy in expected) or all(lp < 0 for lp, _ in expected)


@pytest.mark.slow
def test_runner_scoring_under_data_and_context_parallelism(bpe_tokenizer):
    expected = expected_scores()
    for got in run_distributed(_scores, 2, {"cp": 2}):
        assert_same(got, expected)
    (got0, metrics0), (got1, metrics1) = run_distributed(_scores, 2, {"dp_shard": 2}, bpe_tokenizer.path)
    assert_same(got0, expected)
    assert_same(got1, expected)
    # lm-eval reports on LOCAL_RANK 0 only; every rank logs the same metrics
    assert metrics0 == metrics1 and "eval/lf_choice/acc" in metrics0


class FakeTrainer:
    def __init__(self, runner, last_step, metrics_rank=True):
        self.runner, self.last_step, self.is_metrics_rank = runner, last_step, metrics_rank
        self.printed = []

    def print(self, text):
        self.printed.append(text)


def test_callback_logs_task_metrics_at_its_interval(bpe_tokenizer):
    from latentforge.rl.evaluation import LatentForgeLM
    from latentforge.train.callbacks.eval_tasks import EvalTasks
    from latentforge.train.eval_harness import run_tasks, task_metrics

    reference, runner = build()
    callback = EvalTasks(
        ["lf_choice", "lf_text"], interval=4, tokenizer=bpe_tokenizer, seq_len=SEQ_LEN, micro_batch_size=2, limit=5
    )
    trainer = FakeTrainer(runner, last_step=10)
    callback.on_train_start(trainer)
    logged = {}
    for step in range(1, 11):
        metrics = {"step": step}
        callback.on_step_end(trainer, metrics)
        if len(metrics) > 1:
            logged[step] = metrics
    assert sorted(logged) == [4, 8, 10]
    expected = task_metrics(
        run_tasks(
            LatentForgeLM(model=reference, tokenizer=bpe_tokenizer, max_length=SEQ_LEN),
            ["lf_choice", "lf_text"],
            limit=5,
        )
    )
    for task, values in expected.items():
        for metric, value in values.items():
            assert math.isclose(logged[10][f"eval/{task}/{metric}"], value, rel_tol=1e-5), (task, metric)
    assert trainer.printed[-1].startswith("eval step 10: lf_choice acc")
    assert all(part.training is False for part in runner.model_parts)  # the mode it had before


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    from latentforge.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(["Question: What is 4 plus 5?\nAnswer: 9. The lake freezes in winter. " * 20], VOCAB, str(path))


def test_generation_tasks_and_bad_settings_are_refused():
    from latentforge.train.eval_harness import check_loglikelihood_tasks

    with pytest.raises(ValueError, match=r"\['lf_arith'\] generate text.*latentforge-eval"):
        check_loglikelihood_tasks(["lf_choice", "lf_arith"])
    with pytest.raises(TrainConfigError, match="eval_interval"):
        TrainConfig(eval_tasks=["lf_choice"], eval_interval=5, log_interval=2)
    with pytest.raises(TrainConfigError, match="eval_limit"):
        TrainConfig(eval_limit=0)
