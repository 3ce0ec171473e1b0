"""The GRPO driver: Ray actors for the trainer group, rollout workers and reward workers, and the event loop that
keeps them all busy under the staleness bound.

Flow of one prompt: the prompt source hands it out (uid) -> G requests go to one rollout worker (same prompt, so
its prefill is shared) stamped with `min_version` = the newest pushed version -> finished samples go to a reward
worker -> scored samples gather in the buffer -> a complete group waits until a step takes it.

Flow of one step v: the buffer gives `groups_per_step` groups whose every token is at most K versions old ->
every trainer rank runs the GRPO update (weights v -> v + 1) -> the new weights are broadcast to every rollout
worker, which applies them between two decode steps and keeps generating. Rollouts, rewards and admissions keep
flowing while the trainer computes and while weights move.

Admission control: at most (K + 1) x groups_per_step groups are outstanding (in flight, buffered, or in a step
whose weights are not pushed yet), so rollouts run at most K versions ahead; the buffer's per-token check is the
hard guarantee on top (too-old groups are dropped and their prompts served again). K = 0 is synchronous GRPO.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Any, Callable, Dict, List, Optional, Union, cast

import ray
from ray.exceptions import RayActorError

from latentforge.data.config import TokenizerConfig
from latentforge.model.config import ModelConfig
from latentforge.rl.actors import RewardWorker, RolloutWorker, TrainerRank, remote
from latentforge.rl.buffer import StalenessBuffer
from latentforge.rl.config import GRPOConfig
from latentforge.rl.envs.metrics import episode_metrics
from latentforge.rl.metrics import MetricsLogger, step_metrics
from latentforge.rl.prompts import PromptSource, build_records, prompt_token_ids
from latentforge.train.checkpoint import pack, unpack
from latentforge.train.config import OptimConfig
from latentforge.train.parallel.config import ParallelConfig
from latentforge.train.precision.config import PrecisionConfig

COLLECT_WAIT_S = 0.2
DEATH_NOTICE_S = 10.0  # how long a failed collective call waits to learn which member died
RESTART_COUNTERS = ("worker_restarts", "trainer_restarts")  # kept across a trainer restart's rollback


class ActorDied(Exception):
    role = "actor"  # each subclass names its kind of actor

    def __init__(self, slot: int, handle, cause: Exception):
        super().__init__(f"{self.role} {slot} died")
        self.slot, self.handle, self.cause = slot, handle, cause


class TrainerGroupDied(ActorDied):
    """A trainer rank's process died: the driver rebuilds the group from the newest checkpoint."""

    role = "trainer rank"


class RolloutWorkerDied(ActorDied):
    """A rollout worker's process died during a call the driver waits for: it is replaced."""

    role = "rollout worker"


class GRPOLoop:
    def __init__(
        self,
        cfg: GRPOConfig,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        *,
        tokenizer_spec: Union[TokenizerConfig, str],
        run_dir: str,
        task_seed: int,
        enable_thinking: bool = True,
        parallel_cfg: Optional[ParallelConfig] = None,
        precision_cfg: Optional[PrecisionConfig] = None,
        print_fn=print,
        config_for_logs: Optional[dict] = None,
        stop_requested: Callable[[], Optional[str]] = lambda: None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.tokenizer_spec = tokenizer_spec
        self.run_dir = os.path.abspath(run_dir)
        self.task_seed = task_seed
        self.enable_thinking = enable_thinking
        self.parallel_cfg = parallel_cfg
        self.precision_cfg = precision_cfg
        self.print = print_fn
        self.stop_requested = stop_requested  # -> a reason (e.g. "SIGTERM") to checkpoint and end this launch now
        self.config_for_logs = config_for_logs or {"rl": cfg.to_dict(), "model": self.model_cfg.to_dict()}
        self.G = cfg.rollout.group_size
        self.B = cfg.groups_per_step
        self.buffer = StalenessBuffer(self.G, cfg.max_staleness, cfg.filter_zero_advantage)
        self.version = 0  # the trainer's weights
        self.pushed_version = -1  # the newest version every rollout worker has received
        self.inflight: Dict[int, dict] = {}  # uid -> {"worker", "left"}
        self._training = 0  # groups of the step whose weights are not pushed yet
        self._futures: Dict = {}  # ObjectRef -> (kind, payload)
        self._eval_results: Dict = {}  # (prompt index, sample index) -> scored held-out sample
        self._eval_requests: Dict[int, List[dict]] = {}  # rollout slot -> its held-out requests (resent on death)
        self._attempts = 0  # groups admitted in this launch: a group's samples carry their admission's number
        self._needs_push = False  # a replacement rollout worker waits for the current weights
        self._sync_stale = False  # the broadcast group lost a member: rebuilt before the next push
        self._last_stats: List[dict] = []  # rollout counters at the last step (metrics are differences)
        self._launch_state: Optional[dict] = None  # loop state a trainer restart without checkpoint goes back to
        self.logger: Optional[MetricsLogger] = None  # opened by setup()
        self.counters = collections.Counter()
        self.history: List[dict] = []
        self._step_filtered: List[int] = []  # zero-advantage groups since the last step (logged with it)
        self._evaluating = False
        self._closed = False

    # ================================================================== setup
    def setup(self) -> None:
        from latentforge.data.tokenizer import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{self.model_cfg.vocab_size}: use the tokenizer the policy was trained with"
            )
        train_records = build_records(cfg.prompts.tasks, "train", self.task_seed, self.enable_thinking)
        self.eval_records = build_records(cfg.prompts.eval_tasks, "test", self.task_seed, self.enable_thinking)
        self.source = PromptSource(train_records, seed=cfg.prompts.order_seed, shuffle=cfg.prompts.shuffle)
        self._prompt_ids: Dict[str, List[int]] = {}
        longest = max(len(self._ids(r)) for r in train_records + self.eval_records)
        self.has_envs = any(r.get("env") for r in train_records + self.eval_records)
        completion = max(cfg.rollout.sampling.max_new_tokens, cfg.rollout.episode_tokens() if self.has_envs else 0)
        self.max_seq_len = longest + completion + 8

        if not ray.is_initialized():
            init_ray(cfg.ray_address)
        self._spawn()
        self.logger = MetricsLogger(
            self.run_dir, cfg.run_name, cfg.wandb, self.config_for_logs, cfg.steps, cfg.log_interval, self.print
        )
        loop_state = self._resume()
        self.logger.start(loop_state.get("wandb_run_id") if loop_state else None)
        self._push_weights()  # every worker starts from the trainer's weights (fresh or resumed)
        for i in range(len(self.rollouts)):
            self._issue_collect(i)

    def _metrics_logger(self) -> MetricsLogger:
        if self.logger is None:
            raise RuntimeError("GRPOLoop.setup() must run first: it opens the metrics logger")
        return self.logger

    def _ids(self, record: dict) -> List[int]:
        key = record["id"]
        if key not in self._prompt_ids:
            self._prompt_ids[key] = prompt_token_ids(self.tokenizer, record)
        return self._prompt_ids[key]

    def _spawn(self) -> None:
        from ray.util.placement_group import placement_group

        cfg = self.cfg
        tc, rc, wc = cfg.trainer, cfg.rollout, cfg.reward
        bundles = (
            [_bundle(tc.cpus_per_rank, tc.gpus_per_rank)] * tc.num_ranks
            + [_bundle(rc.cpus_per_worker, rc.gpus_per_worker)] * rc.num_workers
            + [_bundle(wc.cpus_per_worker, 0)] * wc.num_workers
        )
        self.placement = placement_group(bundles, strategy="PACK")
        ray.get(self.placement.ready(), timeout=600)
        self._actor_env = {
            "env_vars": {
                "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
                "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p),
            }
        }
        self._spawn_trainers()
        self._incarnations = 0  # rollout worker processes started so far (each gets a fresh sampling seed)
        self.rollouts = [self._new_rollout(i) for i in range(rc.num_workers)]
        self.rewarders = [self._new_rewarder(i) for i in range(wc.num_workers)]
        self._reward_load = [0] * wc.num_workers
        self._worker_groups = [0] * rc.num_workers
        self._sync_stale = rc.weight_sync == "broadcast"  # the sync group is (re)built before the next push

    def _at(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle)

    def _spawn_trainers(self) -> None:
        tc = self.cfg.trainer
        trainer_cls = remote(
            TrainerRank, num_cpus=tc.cpus_per_rank, num_gpus=tc.gpus_per_rank, runtime_env=self._actor_env
        )
        self.trainers = [
            trainer_cls.options(scheduling_strategy=self._at(r)).remote(r, tc.num_ranks, tc.threads_per_rank)
            for r in range(tc.num_ranks)
        ]
        master = ray.get(self.trainers[0].address.remote())
        self.trainer_info = ray.get(
            [
                t.setup.remote(
                    master,
                    self.model_cfg,
                    self.cfg,
                    self.optim_cfg,
                    self.run_dir,
                    self.parallel_cfg,
                    self.precision_cfg,
                )
                for t in self.trainers
            ]
        )

    def _new_rollout(self, slot: int):
        cfg, rc = self.cfg, self.cfg.rollout
        rollout_cls = remote(
            RolloutWorker,
            num_cpus=rc.cpus_per_worker,
            num_gpus=rc.gpus_per_worker,
            max_concurrency=4,
            runtime_env=self._actor_env,
        )
        # a replacement samples with other random numbers than the worker it replaces (the per-request seeds,
        # which make a group's samples reproducible, are unchanged)
        seed = cfg.seed + 1000 * (slot + 1) + 100_000 * (self._incarnations // rc.num_workers)
        self._incarnations += 1
        stop_ids = [self.tokenizer.im_end_id, self.tokenizer.eod_id]
        return rollout_cls.options(scheduling_strategy=self._at(cfg.trainer.num_ranks + slot)).remote(
            slot,
            self.model_cfg,
            rc,
            self.max_seq_len,
            stop_ids,
            seed,
            None,
            rc.threads_per_worker,
            tokenizer_spec=self.tokenizer_spec if self.has_envs else None,
            record_routes=cfg.router_replay,
        )

    def _new_rewarder(self, slot: int):
        wc = self.cfg.reward
        reward_cls = remote(RewardWorker, num_cpus=wc.cpus_per_worker, runtime_env=self._actor_env)
        bundle = self.cfg.trainer.num_ranks + self.cfg.rollout.num_workers + slot
        return reward_cls.options(scheduling_strategy=self._at(bundle)).remote(wc, self.tokenizer_spec)

    def _join_sync_group(self) -> None:
        """(Re)build the broadcast group of trainer rank 0 and every rollout worker (after a start or a death:
        a collective group cannot lose a member, so every member leaves the old one and joins a new one)."""
        tc, rc = self.cfg.trainer, self.cfg.rollout
        backend = "nccl" if (tc.gpus_per_rank > 0 and rc.gpus_per_worker > 0) else "gloo"
        host, port = ray.get(self.trainers[0].address.remote())
        world = 1 + rc.num_workers
        joins = [
            (self.trainers[0].join_sync_group.remote(host, port, world, backend), ("trainer", 0, self.trainers[0]))
        ] + [
            (w.join_sync_group.remote(host, port, 1 + i, world, backend), ("rollout", i, w))
            for i, w in enumerate(self.rollouts)
        ]
        self._pump_until([ref for ref, _ in joins], owners=dict(joins))
        self._sync_stale = False

    # ================================================================== checkpoint / resume
    def _resume(self) -> Optional[dict]:
        path = self._latest_checkpoint() if self.cfg.resume else None
        if path is None:
            # what a trainer restart before the first checkpoint goes back to (fresh weights are seeded: the same)
            self._launch_state = self._loop_state()
            return None
        state = self._load_checkpoint(path)
        self.print(
            f"resumed from {path} at step {self.version} (next prompt uid {self.source.next_uid}, "
            f"{len(state['prompts']['returned'])} prompts to regenerate, {len(self.buffer)} buffered groups)"
        )
        return state

    def _latest_checkpoint(self) -> Optional[str]:
        # one ObjectRef: ray.get returns its value (Ray's stubs read an untyped handle's call as a list of refs)
        return cast(Optional[str], ray.get(self.trainers[0].latest_checkpoint.remote()))

    def _load_checkpoint(self, path: str) -> dict:
        blobs = self._on_trainers([t.load_checkpoint.remote(path) for t in self.trainers])
        state: dict = unpack(blobs[0])
        self._restore(state)
        return state

    def _restore(self, state: dict) -> None:
        restarts = {k: self.counters[k] for k in RESTART_COUNTERS}
        self.version = state["version"]
        self.source.load_state_dict(state["prompts"])
        self.buffer.load_state_dict(state["buffer"])
        self.counters = collections.Counter(state["counters"])
        for key, count in restarts.items():  # restart budgets are per launch, never rolled back
            self.counters[key] = count
        # the steps after this state are trained again: their old records go (W&B keeps the first values it saw)
        self._metrics_logger().rewind(self.version)

    def _loop_state(self) -> dict:
        prompts = self.source.state_dict()
        # groups still being generated or scored are not saved: their prompts are served again after a resume
        prompts["returned"] = sorted(set(prompts["returned"]) | set(self.inflight))
        return {
            "version": self.version,
            "prompts": prompts,
            "buffer": self.buffer.state_dict(),
            "counters": dict(self.counters),
            "wandb_run_id": getattr(self.logger, "run_id", None),
        }

    def save_checkpoint(self) -> str:
        blob = pack(self._loop_state())
        return self._on_trainers([t.save_checkpoint.remote(blob) for t in self.trainers])[0]

    # ================================================================== weights
    def _push_weights(self) -> dict:
        """Trainer weights (version self.version) -> every rollout worker; rollouts keep running meanwhile. A
        rollout worker that dies meanwhile is replaced and the push starts again (a worker that has these weights
        already skips applying them)."""
        while True:
            try:
                if self._sync_stale:
                    self._join_sync_group()
                result = self._push_once()
                break
            except RolloutWorkerDied as died:
                self._replace_rollout(died.slot, died.cause, died.handle)
        self.pushed_version = self.version
        self._needs_push = False
        return result

    def _push_once(self) -> dict:
        rc = self.cfg.rollout
        start = time.perf_counter()
        if rc.weight_sync == "broadcast":
            trainer_futs = [t.push_broadcast.remote(rc.sync_bucket_mb) for t in self.trainers]
            worker_futs = [w.receive_broadcast.remote() for w in self.rollouts]
        else:
            # rank 0's tensors go into the object store once; each worker fetches them (the reference is resolved
            # into the call's argument), the driver never holds them
            trainer_futs = [t.export_weights.remote() for t in self.trainers]
            worker_futs = [w.load_weights.remote(trainer_futs[0], self.version) for w in self.rollouts]
        owners = {**_owners("trainer", trainer_futs, self.trainers), **_owners("rollout", worker_futs, self.rollouts)}
        self._pump_until(trainer_futs + worker_futs, owners=owners)
        if rc.weight_sync == "broadcast":
            sent = cast(Dict[str, Any], ray.get(trainer_futs[0]))  # one ObjectRef: its dict
            received = ray.get(worker_futs)
            result = {
                "sync_s": sent["sync_s"],
                "sync_gather_s": sent["gather_s"],
                "sync_bytes": sent["bytes"],
                "receive_s": max(r["receive_s"] for r in received),
            }
        else:
            result = {"sync_s": time.perf_counter() - start}
        result["push_wall_s"] = time.perf_counter() - start
        return result

    # ================================================================== the event pump
    def _issue_collect(self, i: int) -> None:
        handle = self.rollouts[i]
        self._futures[handle.collect.remote(COLLECT_WAIT_S)] = ("collect", i, handle)

    def _admit(self) -> None:
        if self.pushed_version < 0 or self._evaluating:
            return  # the workers hold no policy weights yet / evaluation time is not training time
        cap = (self.cfg.max_staleness + 1) * self.B
        while len(self.inflight) + len(self.buffer) + self._training < cap:
            uid, record = self.source.take()
            worker = min(range(len(self.rollouts)), key=lambda i: self._worker_groups[i])
            self._worker_groups[worker] += 1
            self._attempts += 1
            ids = self._ids(record)
            requests = [
                {
                    "group_id": uid,
                    "sample_index": j,
                    "prompt_ids": ids,
                    "kind": "train",
                    "attempt": self._attempts,
                    "seed": sample_seed(self.cfg.seed, uid, j),
                    "min_version": self.pushed_version,
                    **_episode_fields(record),
                }
                for j in range(self.G)
            ]
            self.inflight[uid] = {"worker": worker, "left": self.G, "attempt": self._attempts}
            self.rollouts[worker].submit.remote(requests)  # a dead worker: its collect says so
            self.counters["groups_admitted"] += 1

    def _pump(self, extra=(), wait_s: float = 0.05) -> None:
        """Admit, then handle whatever finished (samples, scores, deaths); returns after `wait_s` at most, or as
        soon as something in `extra` (train / push futures) is done."""
        self._admit()
        watch = list(self._futures) + list(extra)
        ready, _ = ray.wait(watch, num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(watch, num_returns=len(watch), timeout=0)
        for ref in ready:
            if ref not in self._futures:
                continue
            kind, slot, handle, *work = self._futures.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                self._on_death(kind, slot, handle, work, exc)
                continue
            if kind == "collect":
                self._on_samples(result)
                self._issue_collect(slot)
            elif kind == "reward":
                self._reward_load[slot] -= 1
                self._on_scored(result)

    def _pump_until(self, futures, owners: Optional[dict] = None) -> list:
        """Pump until every future is done; their results. A finished future whose actor died raises
        TrainerGroupDied / RolloutWorkerDied at once (`owners`: ref -> (role, index, handle)),
        without waiting for the others (a dead rank's peers may wait in a collective forever)."""
        futures, owners = list(futures), owners or {}
        while True:
            done, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
            for ref in done:
                self._raise_if_died(ref, owners)
            if len(done) == len(futures):
                return ray.get(futures)
            self._pump(extra=futures)

    def _raise_if_died(self, ref, owners: dict) -> None:
        try:
            ray.get(ref)
        except RayActorError as exc:
            if ref not in owners:
                raise
            kind, index, handle = owners[ref]
            raise (TrainerGroupDied if kind == "trainer" else RolloutWorkerDied)(index, handle, exc) from exc
        except Exception:
            # a member of a collective (trainer ranks, the weight broadcast) whose peer died fails with a
            # connection error: report the death, not the symptom
            pending = [other for other in owners if other is not ref]
            deadline = time.monotonic() + DEATH_NOTICE_S
            while pending and time.monotonic() < deadline:
                ready, pending = ray.wait(pending, num_returns=1, timeout=deadline - time.monotonic())
                for other in ready:
                    self._raise_if_died(other, {other: owners[other]})
            raise

    def _on_trainers(self, futures) -> list:
        """A collective call on every trainer rank, pumping rollouts and rewards meanwhile."""
        return self._pump_until(futures, owners=_owners("trainer", futures, self.trainers))

    def _on_samples(self, samples) -> None:
        if not samples:
            return
        records = [
            self.eval_records[s.group_id] if s.meta.get("kind") == "eval" else self.source.record(s.group_id)
            for s in samples
        ]
        self._score(samples, records)

    def _score(self, samples, records) -> None:
        i = min(range(len(self.rewarders)), key=lambda k: self._reward_load[k])
        self._reward_load[i] += 1
        handle = self.rewarders[i]
        self._futures[handle.score.remote(samples, records)] = ("reward", i, handle, samples, records)

    def _on_scored(self, samples) -> None:
        for s in samples:
            failures = s.reward_info.get("failures")
            if failures:
                self.counters["reward_failures"] += len(failures)
                if self.counters["reward_failures"] <= 3:
                    f = failures[0]
                    self.print(
                        f"reward function {f['function']} failed ({f['status']}), scored 0: "
                        f"{f['message'].strip().splitlines()[-1] if f['message'].strip() else ''}"
                    )
            if s.meta.get("kind") == "eval":
                self._eval_results[(s.group_id, s.sample_index)] = s
                continue
            entry = self.inflight.get(s.group_id)
            if entry is None or entry["attempt"] != s.meta.get("attempt"):
                continue  # its group was re-queued (worker death, trainer restart): a newer attempt counts
            entry["left"] -= 1
            status = self.buffer.add(s)
            if entry["left"] == 0:
                self._worker_groups[entry["worker"]] -= 1
                del self.inflight[s.group_id]
                if status == "zero_advantage":
                    self.counters["groups_zero_advantage"] += 1
                    self._step_filtered.append(s.group_id)

    def _evict_stale(self) -> None:
        stale = self.buffer.evict_stale(self.version)
        if stale:
            self.source.give_back([g.group_id for g in stale])
            self.counters["groups_stale_dropped"] += len(stale)

    # ================================================================== failures
    def _on_death(self, kind: str, slot: int, handle, work: list, exc: Exception) -> None:
        if kind == "collect":
            self._replace_rollout(slot, exc, handle)
        else:
            self._reward_load[slot] -= 1
            if handle is self.rewarders[slot]:
                self._count_restart(f"reward worker {slot}", exc)
                _kill(handle)
                self.rewarders[slot] = self._new_rewarder(slot)
                self._reward_load[slot] = 0
            self._score(*work)  # the samples it was scoring: scored again, none lost

    def _replace_rollout(self, slot: int, exc: Exception, handle) -> None:
        """A new worker process in the dead one's place; its groups are generated again from scratch (samples of
        theirs still being scored are ignored by their attempt number)."""
        if handle is not self.rollouts[slot]:
            return  # a call to an earlier incarnation: replaced already
        self._count_restart(f"rollout worker {slot}", exc)
        _kill(handle)
        requeued = sorted(uid for uid, entry in self.inflight.items() if entry["worker"] == slot)
        for uid in requeued:
            self.buffer.drop_partial(uid)
            del self.inflight[uid]
        self.source.give_back(requeued)
        self.counters["groups_requeued"] += len(requeued)
        self._worker_groups[slot] = 0
        self.rollouts[slot] = self._new_rollout(slot)
        if slot < len(self._last_stats):
            self._last_stats[slot] = ray.get(self.rollouts[slot].stats.remote())  # counters start at 0 again
        self._issue_collect(slot)
        self._sync_stale = self.cfg.rollout.weight_sync == "broadcast"
        self._needs_push = True  # the newcomer has no weights: the next chance to push sends them
        if self._evaluating:
            self.rollouts[slot].submit.remote(
                [
                    r
                    for r in self._eval_requests.get(slot, [])
                    if (r["group_id"], r["sample_index"]) not in self._eval_results
                ]
            )
        self.print(f"rollout worker {slot} died ({type(exc).__name__}); replaced, {len(requeued)} prompts re-queued")

    def _restart_trainers(self, died: TrainerGroupDied) -> None:
        """Every rank is replaced (a collective group cannot lose a member) and starts from the newest checkpoint;
        the loop goes back to that checkpoint's state: the steps after it are trained again, from the same
        prompts."""
        self._count_restart(f"trainer rank {died.slot}", died.cause, budget="trainer")
        for handle in self.trainers:
            _kill(handle)
        # work in flight belongs to the abandoned steps: dropped (late samples are ignored by attempt number),
        # and nothing is admitted until the workers hold the checkpoint's weights
        for w in self.rollouts:
            w.drop_requests.remote("train")
        self.inflight.clear()
        self._worker_groups = [0] * len(self.rollouts)
        self._training = 0
        self._step_filtered = []
        self.pushed_version = -1
        self._spawn_trainers()
        path = self._latest_checkpoint()
        if path is not None:
            self._load_checkpoint(path)
        else:
            # _resume() keeps the launch state whenever it found no checkpoint, and a checkpoint found then is
            # still there
            assert self._launch_state is not None, "a trainer restart without a checkpoint needs the launch state"
            self._restore(self._launch_state)
        self._sync_stale = self.cfg.rollout.weight_sync == "broadcast"
        self._push_weights()
        self.print(
            f"{died} ({type(died.cause).__name__}); trainer group rebuilt from "
            f"{path or 'the initial weights'}, continuing at step {self.version}"
        )

    def _count_restart(self, who: str, exc: Exception, budget: str = "worker") -> None:
        key, limit = (
            ("trainer_restarts", self.cfg.max_trainer_restarts)
            if budget == "trainer"
            else ("worker_restarts", self.cfg.max_worker_restarts)
        )
        self.counters[key] += 1
        if self.counters[key] > limit:
            raise RuntimeError(
                f"{who} died ({type(exc).__name__}) and the run has used its {limit} restarts "
                f"(rl.max_{key}={limit}): stopping. Newest checkpoint: {newest_checkpoint(self.run_dir)}; raise "
                f"rl.max_{key} or find why the processes die (out of memory? see the Ray logs)"
            ) from exc

    # ================================================================== evaluation
    def evaluate(self) -> dict:
        """Held-out prompts with the current weights: one greedy answer each (`eval_temperature`, 0 = greedy) for
        reward and accuracy, plus `eval_samples` answers each at the rollout temperature (the distribution RL
        optimises) with fixed seeds, so evaluations before and after training draw the same random numbers."""
        start = time.perf_counter()
        self._eval_results = {}
        n = len(self.eval_records)
        if n == 0:
            return {}
        k = self.cfg.eval_samples
        per_worker = collections.defaultdict(list)
        for i, record in enumerate(self.eval_records):
            for j in range(1 + k):
                temperature = self.cfg.eval_temperature if j == 0 else self.cfg.rollout.sampling.temperature
                per_worker[(i * (1 + k) + j) % len(self.rollouts)].append(
                    {
                        "group_id": i,
                        "sample_index": j,
                        "prompt_ids": self._ids(record),
                        "kind": "eval",
                        "seed": sample_seed(-1, i, j),
                        "temperature": temperature,
                        "min_version": self.pushed_version,
                        **_episode_fields(record),
                    }
                )
        for w, requests in per_worker.items():
            self.rollouts[w].submit.remote(requests)
        self._eval_requests = dict(per_worker)
        self._evaluating = True
        try:
            while len(self._eval_results) < n * (1 + k):
                if self.stop_requested():
                    return {}  # preempted: the evaluation is abandoned, the checkpoint matters
                self._pump()
                if self._needs_push:
                    self._push_weights()
        finally:
            self._evaluating = False
        results = [self._eval_results[key] for key in sorted(self._eval_results)]
        self._eval_results, self._eval_requests = {}, {}
        greedy = [s for s in results if s.sample_index == 0]
        sampled = [s for s in results if s.sample_index > 0]
        out = {
            "eval_reward": _mean(s.reward for s in greedy),
            "eval_accuracy": _mean(bool(s.reward_info.get("correct")) for s in greedy),
            "eval_response_len": _mean(len(s.completion_ids) for s in greedy),
            "eval_version": self.version,
            "eval_s": time.perf_counter() - start,
            "eval_samples": [s.text for s in greedy[:3]],
        }
        if sampled:
            out.update(
                eval_sampled_reward=_mean(s.reward for s in sampled),
                eval_sampled_accuracy=_mean(bool(s.reward_info.get("correct")) for s in sampled),
                eval_sampled_reward_se=_standard_error([s.reward for s in sampled]),
            )
        out.update(episode_metrics(greedy, prefix="eval_"))
        out.update(episode_metrics(sampled, prefix="eval_sampled_"))
        return out

    # ================================================================== the loop
    def run(self) -> dict:
        cfg = self.cfg
        if not hasattr(self, "trainers"):
            self.setup()
        summary = {"start_version": self.version}
        self.wall_start = time.perf_counter()
        self.eval_time = 0.0
        if (self.version == 0 or cfg.eval_interval) and self.eval_records:
            first = self.evaluate()
            if first:  # empty when preempted during it
                self.eval_time += first["eval_s"]
                summary["eval_before"] = first
                self._metrics_logger().log({"step": self.version, **first}, console=False)
                self.print(f"eval before step {self.version}: {describe_eval(first)} ({first['eval_s']:.1f}s)")
        self._last_stats = self._rollout_stats()
        self._trainer_wait = 0.0
        self._saved_version = self.version if self.version > 0 else None  # a resumed version is on disk already
        while self.version < cfg.last_step:
            try:
                if not self._step():
                    break
            except TrainerGroupDied as died:
                self._restart_trainers(died)
                self._saved_version = self.version if self.version > 0 else None
        wall = time.perf_counter() - self.wall_start - self.eval_time
        reason = self.stop_requested()
        if reason:  # preempted: checkpoint first (unless this step already wrote it), no final evaluation
            path = self.save_checkpoint() if self._saved_version != self.version else None
            self.print(
                f"stopping at step {self.version} ({reason}): checkpoint saved" + (f" to {path}" if path else "")
            )
            summary.update(steps=self.version, wall_s=wall, counters=dict(self.counters), stopped=reason)
            return summary
        final = self.evaluate()
        summary.update(eval_after=final, steps=self.version, wall_s=wall, counters=dict(self.counters))
        if final:
            self._metrics_logger().log({"step": self.version, **final}, console=False)
            self.print(f"eval after step {self.version}: {describe_eval(final)}; training wall time {wall:.1f}s")
        return summary

    def _step(self) -> bool:
        """Wait for a batch, train it, push the weights, log, checkpoint; False: preempted before the step."""
        cfg = self.cfg
        step_start = time.perf_counter()
        if not self._collect_batch():
            return False  # the step never started: its buffered groups go into the checkpoint
        waited = time.perf_counter() - step_start
        self._trainer_wait += waited
        groups = self.buffer.pop(self.B, self.version)
        self._training = len(groups)
        groups_ref = ray.put(groups)
        train = self._on_trainers([t.train_step.remote(groups_ref) for t in self.trainers])[0]
        trained_version = self.version
        self.version += cfg.updates_per_batch  # a version per optimizer step: staleness counts them
        push = self._push_weights()
        self._training = 0
        self._evict_stale()
        stats = self._rollout_stats()
        wall = time.perf_counter() - self.wall_start - self.eval_time
        self.counters["samples_overlong"] += sum(s.truncated for g in groups for s in g.samples)
        metrics = step_metrics(
            trained_version,
            groups,
            train,
            push,
            stats,
            self._last_stats,
            normalize_std=cfg.loss.normalize_std,
            waited=waited,
            wall=wall,
            previous_wall=self.history[-1]["wall_s"] if self.history else 0.0,
            trainer_wait=self._trainer_wait,
            counters=self.counters,
            filtered=self._step_filtered,
        )
        metrics.update(episode_metrics(s for g in groups for s in g.samples))
        metrics.update({k: self.counters[k] for k in RESTART_COUNTERS + ("groups_requeued",)})
        self._last_stats = stats
        self._step_filtered = []
        if (
            cfg.eval_interval
            and crossed(trained_version, self.version, cfg.eval_interval)
            and self.version < cfg.last_step
            and not self.stop_requested()
        ):
            ev = self.evaluate()
            self.eval_time += ev.get("eval_s", 0.0)
            metrics.update(ev)
        self._metrics_logger().log(metrics)
        self.history.append(metrics)
        if (
            crossed(trained_version, self.version, cfg.checkpoint_interval)
            or self.version >= cfg.last_step
            or self.stop_requested()
        ):
            metrics["checkpoint"] = self.save_checkpoint()
            self._saved_version = self.version
        return True

    WAITING_NOTICE_S = 60.0  # while a step's batch fills, a progress line this often

    def _collect_batch(self) -> bool:
        """Pump until the buffer holds a step's groups; False when a stop was requested first."""
        filtered_before = self.counters["groups_zero_advantage"]
        next_notice = time.monotonic() + self.WAITING_NOTICE_S
        while self.buffer.num_ready(self.version) < self.B and not self.stop_requested():
            self._pump()
            if self._needs_push:
                self._push_weights()
            self._evict_stale()
            if time.monotonic() >= next_notice:  # a long wait shows progress instead of silence
                next_notice = time.monotonic() + self.WAITING_NOTICE_S
                self.print(
                    f"step {self.version + 1}: {self.buffer.num_ready(self.version)}/{self.B} groups ready; "
                    f"{self.counters['groups_zero_advantage'] - filtered_before} filtered so far for equal "
                    "rewards (rl.filter_zero_advantage)"
                )
            if self.counters["groups_zero_advantage"] - filtered_before > max(1000, 100 * self.B):
                raise RuntimeError(
                    f"{self.counters['groups_zero_advantage'] - filtered_before} groups in a row had equal "
                    "rewards for every sample (no learning signal): the policy solves all or none of these "
                    "prompts. Start from a better (SFT'd) checkpoint, change the tasks, raise "
                    "rl.rollout.group_size or temperature, or set rl.filter_zero_advantage=false"
                )
        return not self.stop_requested()

    def _rollout_stats(self) -> list:
        while True:
            futures = [w.stats.remote() for w in self.rollouts]
            try:
                return self._pump_until(futures, owners=_owners("rollout", futures, self.rollouts))
            except RolloutWorkerDied as died:
                self._replace_rollout(died.slot, died.cause, died.handle)

    # ================================================================== teardown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in getattr(self, "rollouts", []):
            try:
                ray.get(handle.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - tearing down anyway
                pass
        for handle in getattr(self, "rewarders", []) + getattr(self, "trainers", []):
            try:
                ray.get(handle.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001
                pass
        for handle in getattr(self, "rollouts", []) + getattr(self, "rewarders", []) + getattr(self, "trainers", []):
            ray.kill(handle)
        if getattr(self, "placement", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
        if self.logger is not None:
            self.logger.close()


def init_ray(address: Optional[str]) -> None:
    """Connect to `address` (a cluster), or start a local Ray bound to loopback with no dashboard, so nothing of
    a laptop or single-node run is reachable from (or sent to) the network."""
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
        return
    from ray._private import ray_constants

    # Ray turns a 127.0.0.1 node address into the machine's routable IP unless "clusters" are off (its
    # single-machine mode for macOS/Windows); the switch is read during ray.init only, so it is restored after
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def describe_eval(ev: dict) -> str:
    text = f"greedy reward {ev['eval_reward']:.3f} accuracy {ev['eval_accuracy']:.3f}"
    if "eval_sampled_reward" in ev:
        text += f", sampled reward {ev['eval_sampled_reward']:.3f} accuracy {ev['eval_sampled_accuracy']:.3f}"
    if "eval_turns" in ev:
        text += f", turns {ev['eval_turns']:.2f} tool error rate {ev['eval_tool_error_rate']:.2f}"
    return text


def _episode_fields(record: dict) -> dict:
    """What a rollout worker needs to play an environment episode of `record` (nothing for plain prompts)."""
    return {"record": record} if record.get("env") else {}


def _standard_error(values) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def sample_seed(run_seed: int, uid: int, index: int) -> int:
    """The sampling seed of sample `index` of prompt `uid`: the same on every machine and after a resume
    (Python hashes tuples of ints deterministically)."""
    return hash((run_seed, uid, index)) & (2**63 - 1)


def _owners(role: str, futures: list, handles: list) -> dict:
    """ref -> (role, index, handle) of calls made one per actor, in order."""
    return {ref: (role, i, handle) for i, (ref, handle) in enumerate(zip(futures, handles))}


def newest_checkpoint(run_dir: str) -> str:
    folder = os.path.join(run_dir, "checkpoints")
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step_")) if os.path.isdir(folder) else []
    return os.path.join(folder, steps[-1]) if steps else "none yet"


def _kill(handle) -> None:
    with contextlib.suppress(Exception):  # it may be dead already
        ray.kill(handle, no_restart=True)


def _bundle(cpus: float, gpus: float) -> dict:
    bundle = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    return bundle


def crossed(before: int, after: int, interval: int) -> bool:
    """Whether a multiple of `interval` lies in (before, after]: a batch of several optimizer steps may jump
    over the exact multiple."""
    return after // interval > before // interval
