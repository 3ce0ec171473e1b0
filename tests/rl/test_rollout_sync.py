"""Rollout worker + trainer without Ray: engine/trainer log-prob agreement at staleness 0, version stamps of an
in-flight weight update, and the weight-sync broadcast over a standalone gloo group."""

import threading
import time

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.rl.actors.rollout import RolloutWorker
from latentforge.rl.buffer import Group
from latentforge.model.engine import EngineConfig, SamplingParams
from latentforge.rl.config import GRPOConfig, RolloutConfig
from latentforge.rl.policy import token_logprobs
from latentforge.rl.trainer import PolicyTrainer
from latentforge.rl.weight_sync import WeightSyncGroup, plan_buckets, receive_state, send_state, state_spec
from tests.distributed import free_port
from tests.rl.helpers import micro_model_cfg
from latentforge.train.config import OptimConfig

STOP = 3


def full_sequence_logprobs(model, sample, temperature=1.0):
    tokens = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    logp = token_logprobs(logits, tokens[:, 1:], temperature)[0]
    return logp[len(sample.prompt_ids) - 1 :]


def generate(worker, groups, samples_per_group, max_new_tokens=None, min_version=0):
    requests = [
        {
            "group_id": g,
            "sample_index": i,
            "prompt_ids": [1, 5 + g, 7, 9 + i % 3],
            "seed": 10 * g + i,
            "min_version": min_version,
            "kind": "train",
            **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
        }
        for g in range(groups)
        for i in range(samples_per_group)
    ]
    worker.submit(requests)
    out = []
    deadline = time.monotonic() + 120
    while len(out) < len(requests):
        assert time.monotonic() < deadline, "rollout worker produced nothing"
        out += worker.collect(1.0)
    return sorted(out, key=lambda s: (s.group_id, s.sample_index))


def test_engine_and_trainer_agree_at_staleness_zero(tmp_path):
    """Same weights, float32: the behaviour log-probs of MTP-drafted sampling equal the trainer's to < 1e-5."""
    torch.set_num_threads(1)
    model_cfg = micro_model_cfg()
    cfg = GRPOConfig(
        rollout={
            "group_size": 4,
            "sampling": {"max_new_tokens": 24, "temperature": 0.8},
            "engine": {"draft_tokens": 2},
        },
        trainer={"micro_batch_size": 8},
        filter_overlong=False,
    )
    trainer = PolicyTrainer(model_cfg, cfg, OptimConfig(lr=1e-3, schedule="constant"), str(tmp_path))
    worker = RolloutWorker(0, model_cfg, cfg.rollout, max_seq_len=64, stop_token_ids=[STOP], seed=5)
    try:
        worker.stage_weights(trainer.full_state_dict(), 0)
        worker.wait_for_version(0)
        samples = generate(worker, groups=2, samples_per_group=4)
        stats = worker.stats()
        assert stats["verify_rows"] > 0 and len(stats["drafted"]) == 2  # drafting was on
        worst = 0.0
        for s in samples:
            assert s.versions == [0] * len(s.completion_ids)
            ref = full_sequence_logprobs(trainer.model, s, temperature=0.8)
            worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
        assert worst < 1e-5, worst
        for i, s in enumerate(samples):
            s.reward = float(i % 2)
        metrics = trainer.train_step([Group(g, [s for s in samples if s.group_id == g]) for g in range(2)])
        assert metrics["fresh_tokens"] == metrics["tokens"] > 0
        assert metrics["mismatch_fresh_max"] < 1e-5
        assert metrics["mismatch_fresh_sum"] / metrics["fresh_tokens"] < 1e-6
        assert trainer.version == 1
    finally:
        worker.stop()


def test_in_flight_update_stamps_versions(tmp_path):
    """Weights pushed while sequences are being generated: every token carries the version that produced it,
    versions never go back, the running sequences are not dropped; with cache recompute each token's behaviour
    log-prob is exactly the log-prob under the weights of its stamp."""
    torch.set_num_threads(1)
    model_cfg = micro_model_cfg()
    torch.manual_seed(0)
    old = HybridModel(model_cfg).eval()
    new = HybridModel(model_cfg).eval()
    rc = RolloutConfig(
        sampling=SamplingParams(max_new_tokens=48),
        engine=EngineConfig(draft_tokens=2, weight_update_policy="recompute", max_batch=8),
    )
    worker = RolloutWorker(0, model_cfg, rc, max_seq_len=64, stop_token_ids=[], seed=1)
    try:
        worker.stage_weights(old.state_dict(), 0)
        worker.wait_for_version(0)
        requests_done = []
        worker.submit(
            [
                {
                    "group_id": g,
                    "sample_index": 0,
                    "prompt_ids": [1, 4 + g],
                    "seed": g,
                    "min_version": 0,
                    "kind": "train",
                }
                for g in range(6)
            ]
        )
        deadline = time.monotonic() + 60
        while worker.engine.stats.generated_tokens < 12:  # the sequences are under way
            assert time.monotonic() < deadline
            time.sleep(0.001)
        worker.stage_weights({k: v.clone() for k, v in new.state_dict().items()}, 1)
        while len(requests_done) < 6:
            assert time.monotonic() < deadline
            requests_done += worker.collect(1.0)
        straddled = 0
        for s in requests_done:
            assert len(s.completion_ids) == 48 and s.finish_reason == "length"
            assert s.versions == sorted(s.versions) and set(s.versions) <= {0, 1}
            straddled += len(set(s.versions)) == 2
            logp_old, logp_new = full_sequence_logprobs(old, s), full_sequence_logprobs(new, s)
            for t, version in enumerate(s.versions):
                ref = logp_old[t] if version == 0 else logp_new[t]
                assert abs(ref.item() - s.logprobs[t]) < 1e-5, (t, version)
        assert straddled > 0, "no sequence straddled the update; the test did not exercise it"
        assert worker.stats()["updates"] == 2
    finally:
        worker.stop()


def in_threads(fn, world_size, *args):
    """fn(rank, world_size, *args) on one thread per rank (a standalone gloo group needs no process of its own)."""
    results, errors = [None] * world_size, []

    def body(rank):
        try:
            results[rank] = fn(rank, world_size, *args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def _sync_roundtrip(rank, world_size, port, bucket_mb):
    gen = torch.Generator().manual_seed(0)  # per thread: the global RNG is shared by the rank threads
    state = {
        "a.weight": torch.randn(300, 200, generator=gen),
        "b.bias": torch.randn(7, generator=gen),
        "c.steps": torch.arange(5),
        "d.half": torch.randn(64, 3, generator=gen).half(),
    }
    group = WeightSyncGroup("127.0.0.1", port, rank, world_size, "gloo", timeout_s=60)
    try:
        if rank == 0:
            send_state(group, state, version=7, bucket_mb=bucket_mb)
            return True
        spec = state_spec({k: torch.empty_like(v) for k, v in state.items()})
        received, version = receive_state(group, spec, bucket_mb=bucket_mb)
        assert version == 7
        return all(torch.equal(received[k], state[k]) and received[k].dtype == state[k].dtype for k in state)
    finally:
        group.close()


def test_broadcast_weight_sync_roundtrip():
    """Trainer rank 0 -> 2 workers over a standalone gloo group, several buckets of mixed dtypes."""
    spec = state_spec({"x": torch.zeros(300, 200), "y": torch.zeros(7), "z": torch.zeros(5, dtype=torch.long)})
    assert len(plan_buckets(spec, 1 << 10)) == 3
    assert in_threads(_sync_roundtrip, 3, free_port(), 0) == [True, True, True]


def _sync_mismatch(rank, world_size, port):
    group = WeightSyncGroup("127.0.0.1", port, rank, world_size, "gloo", timeout_s=20)
    try:
        if rank == 0:
            try:
                send_state(group, {"w": torch.zeros(4, 4)}, version=1)
            except RuntimeError:
                pass  # the receiver stopped listening after the header: the sender's broadcast fails, it never hangs
            return "sender done"
        with pytest.raises(RuntimeError, match="same model config"):
            receive_state(group, state_spec({"w": torch.zeros(4, 5)}))
        return "refused"
    finally:
        group.close()


def test_broadcast_refuses_a_different_layout():
    assert in_threads(_sync_mismatch, 2, free_port()) == ["sender done", "refused"]
