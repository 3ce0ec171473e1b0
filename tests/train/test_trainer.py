"""The loop on one process against a hand-written reference, the non-finite skip, SIGTERM, exact in-process resume."""

import functools
import math
import os
import signal

import pytest
import torch

from latentforge.data.tokenizer import Tokenizer, TokenizerMismatchError
from latentforge.model import HybridModel
from latentforge.model.recipes import compose, model_config_from
from latentforge.train.callbacks import Callback, PreemptionHandler
from latentforge.train.checkpoint import CheckpointManager
from latentforge.train.config import OptimConfig, TrainConfig
from latentforge.train.optim import param_groups
from latentforge.train.parallel import ParallelConfig, build_runner
from latentforge.train.schedule import LRSchedule
from latentforge.train.trainer import NonFiniteLossError, ResumeMismatchError, Trainer

from .loss_reference import reference_loss
from .synthetic import SyntheticLoader

SEQ, MICRO, GLOBAL = 32, 2, 4  # two micro-batches per step on one process


@functools.lru_cache(maxsize=1)
def small_config():
    return model_config_from(
        compose(
            [
                "recipe=tiny",
                "model.vocab_size=256",
                "model.hidden_size=64",
                "model.num_experts=8",
                "model.top_k=2",
                "model.mlp_intermediate_size=128",
                "model.shared_expert_intermediate_size=64",
                # one MTP depth: the model keeps only the last application's MoE aux loss and
                # load, while the runner counts every depth (reported; not the loop's business)
                "model.mtp_depths=1",
            ]
        )
    )


def make_trainer(
    tmp_path,
    *,
    steps=4,
    stop_at=None,
    interval=100,
    runner_wrapper=None,
    callbacks=(),
    seed=0,
    max_nonfinite=3,
    cfg=None,
    tokenizer=None,
):
    cfg = cfg or small_config()
    torch.manual_seed(seed)
    model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig())
    if runner_wrapper is not None:
        runner = runner_wrapper(runner)
    train_cfg = TrainConfig(
        steps=steps,
        stop_at_step=stop_at,
        seq_len=SEQ,
        micro_batch_size=MICRO,
        global_batch_size=GLOBAL,
        checkpoint_interval=interval,
        max_consecutive_nonfinite=max_nonfinite,
    )
    optim_cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.5)
    loader = SyntheticLoader(cfg.vocab_size, SEQ, MICRO)
    return Trainer(
        runner=runner,
        loader=loader,
        train_cfg=train_cfg,
        optim_cfg=optim_cfg,
        checkpoints=CheckpointManager(str(tmp_path / "ckpt"), keep_last=2),
        callbacks=list(callbacks),
        model_config=cfg.to_dict(),
        tokenizer=tokenizer,
    ), model


class Recorder(Callback):
    def __init__(self):
        self.metrics = []

    def on_step_end(self, trainer, metrics):
        self.metrics.append(dict(metrics))


def test_loop_matches_a_hand_written_reference(tmp_path):
    recorder = Recorder()
    trainer, model = make_trainer(tmp_path, steps=3, callbacks=[recorder])
    assert trainer.fit() == "finished"

    # the reference: one forward over the whole global batch, torch's clip, plain AdamW, the same schedule
    cfg = small_config()
    torch.manual_seed(0)
    ref = HybridModel(cfg)
    opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    sched = LRSchedule(trainer.optim_cfg, 3)
    loader = SyntheticLoader(cfg.vocab_size, SEQ, GLOBAL)
    losses = []
    for step in range(3):
        batch = next(loader)
        opt.zero_grad()
        out = reference_loss(ref, batch["input_ids"], batch["labels"], seq_idx=batch["seq_idx"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        opt.step()
        ref.update_expert_bias(out.expert_load)
        losses.append(out.loss.item())

    assert [m["step"] for m in recorder.metrics] == [1, 2, 3]
    assert [m["loss"] for m in recorder.metrics] == pytest.approx(losses, rel=1e-5)
    assert [m["lr"] for m in recorder.metrics] == [sched.lr_at(s) for s in range(3)]
    # Adam divides by sqrt(v): an element whose gradient is near zero turns its rounding (micro-batches summed vs one
    # forward) into a step-sized difference. One element of 41K of a Mamba in_proj moved 2.2e-5 on an AVX512 CPU;
    # 5e-5 is 0.5% of one step at lr 1e-2, while a wrong update moves elements by a whole step
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=5e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)  # the expert bias followed the same loads
    assert recorder.metrics[-1]["moe_imbalance"] >= 1.0
    assert trainer.state.tokens_seen == 3 * GLOBAL * SEQ
    assert trainer.last_checkpoint.endswith("step_00000003")


class NonFiniteAt:
    """Wraps a runner: at the given steps the loss and every gradient come back NaN."""

    def __init__(self, runner, steps):
        self.runner, self.steps, self.calls = runner, set(steps), 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward_backward(self, micro_batches):
        result = self.runner.forward_backward(micro_batches)
        self.calls += 1
        if self.calls in self.steps:
            for part in self.runner.model_parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            result = dict(result, loss=float("nan"))
        return result


def test_non_finite_steps_are_skipped_counted_and_too_many_stop_the_run(tmp_path):
    recorder = Recorder()
    trainer, model = make_trainer(
        tmp_path, steps=10, callbacks=[recorder], max_nonfinite=2, runner_wrapper=lambda r: NonFiniteAt(r, {2, 4, 5})
    )
    snapshots = []

    class Snapshot(Callback):
        def on_step_end(self, trainer, metrics):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row, the last at step 5"):
        trainer.fit()
    assert [m["skipped"] for m in recorder.metrics] == [False, True, False, True]
    assert [m["skipped_steps"] for m in recorder.metrics] == [0, 1, 1, 2]
    assert trainer.state.skipped_steps == 3 and trainer.state.step == 5
    assert math.isnan(recorder.metrics[1]["loss"])
    for name, value in snapshots[1].items():  # the skipped step left every weight as it was
        assert torch.equal(value, snapshots[0][name]), name
    assert not torch.equal(snapshots[2]["lm_head.weight"], snapshots[1]["lm_head.weight"])  # then training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())


class SignalAt(Callback):
    order = 80  # before the preemption handler looks

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    trainer, _ = make_trainer(tmp_path, steps=10, callbacks=[SignalAt(2), PreemptionHandler()])
    assert trainer.fit() == "signal SIGTERM"
    assert trainer.state.step == 2
    assert trainer.last_checkpoint.endswith("step_00000002")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored after the run


def test_resume_in_process_is_bitwise(tmp_path):
    straight_rec = Recorder()
    straight, straight_model = make_trainer(tmp_path / "a", steps=3, callbacks=[straight_rec])
    straight.fit()

    first, _ = make_trainer(tmp_path / "b", steps=3, stop_at=2)
    assert first.fit() == "train.stop_at_step=2"
    resumed_rec = Recorder()
    # other initial weights: everything must come from the checkpoint
    resumed, resumed_model = make_trainer(tmp_path / "b", steps=3, callbacks=[resumed_rec], seed=123)
    assert resumed.resume_if_possible().endswith("step_00000002")
    assert resumed.state.step == 2 and resumed.state.tokens_seen == 2 * GLOBAL * SEQ
    assert resumed.fit() == "finished"
    assert [m["loss"] for m in resumed_rec.metrics] == [m["loss"] for m in straight_rec.metrics[2:]]
    for (name, p), q in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(p, q), name


class FakeTokenizer:
    check_matches = Tokenizer.check_matches  # the data package's comparison and message

    def __init__(self, digest):
        self.digest = digest

    def fingerprint(self):
        return {"kind": "bpe", "vocab_size": 256, "sha256": self.digest}


def test_resume_refuses_another_tokenizer_or_model(tmp_path):
    first, _ = make_trainer(tmp_path, steps=1, tokenizer=FakeTokenizer("a" * 64))
    first.fit()
    other_tokenizer, _ = make_trainer(tmp_path, steps=2, tokenizer=FakeTokenizer("b" * 64))
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        other_tokenizer.resume_if_possible()
    bigger = model_config_from(compose(["recipe=tiny", "model.vocab_size=256"]))
    other_model, _ = make_trainer(tmp_path, steps=2, cfg=bigger, tokenizer=FakeTokenizer("a" * 64))
    with pytest.raises(ResumeMismatchError, match="hidden_size"):
        other_model.resume_if_possible()
