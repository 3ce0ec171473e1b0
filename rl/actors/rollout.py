"""A rollout worker: the generation engine (MTP drafting) in a loop of its own, fed with requests, drained of
finished samples, and given new weights while it keeps generating.

The loop thread owns the engine: between two engine steps it applies staged weights (the generation stall per
update is exactly that copy), admits requests whose `min_version` the weights have reached, and steps. Weights
arrive on another thread (a broadcast receive, or the object store) into staging buffers, so receiving costs the
loop nothing. Plain Python; `rl.actors.remote` wraps it as a threaded Ray actor.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import replace
from typing import Dict, List, Optional

import torch

from latentforge.model import HybridModel, ModelConfig
from latentforge.rl.buffer import Sample
from latentforge.rl.config import RolloutConfig
from latentforge.model.engine import Engine, SamplingParams
from latentforge.rl.weight_sync import WeightSyncGroup, receive_state, state_spec

NO_WEIGHTS = -1  # version of a worker that has not received weights yet: it generates nothing


class RolloutWorker:
    def __init__(
        self,
        worker_index: int,
        model_cfg: ModelConfig,
        cfg: RolloutConfig,
        max_seq_len: int,
        stop_token_ids=(),
        seed: int = 0,
        device: Optional[str] = None,
        threads: Optional[int] = None,
        tokenizer_spec=None,
        record_routes: bool = False,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.index = worker_index
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(seed)
        model = HybridModel(model_cfg).to(self.device).eval().requires_grad_(False)
        self.spec = state_spec(model.state_dict())
        engine_cfg = replace(cfg.engine, max_seq_len=max_seq_len, seed=seed, record_routes=record_routes)
        self.engine = Engine(model, engine_cfg, version=NO_WEIGHTS)
        self.stop_token_ids = tuple(stop_token_ids)
        self._queue: deque = deque()  # requests not yet given to the engine
        self._meta: Dict[str, dict] = {}  # request id -> request
        self._done: List[Sample] = []
        self._staged = None  # (tensors, version), newest wins
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._have_done = threading.Condition(self._lock)
        self._stopping = False
        self._error: Optional[str] = None
        self._sync: Optional[WeightSyncGroup] = None
        self._counters = {
            "busy_s": 0.0,
            "idle_s": 0.0,
            "stall_s": 0.0,
            "updates": 0,
            "generated_tokens": 0,
            "finished": 0,
            "verify_rows": 0,
            "verify_tokens": 0,
        }
        # multi-turn environment episodes (rl/envs/episode.py); needs the tokenizer to render observations
        self.episodes = None if tokenizer_spec is None else episode_runner(self, tokenizer_spec, max_seq_len)
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{worker_index}", daemon=True)
        self._thread.start()

    # ----- requests in, samples out ----------------------------------------------------------------------------
    def submit(self, requests: List[dict]) -> None:
        """Each request: group_id, sample_index, prompt_ids, seed, min_version, kind ("train" / "eval"),
        and optionally temperature, max_new_tokens."""
        episodes = [r for r in requests if (r.get("record") or {}).get("env")]
        runner = self.episodes
        if episodes and runner is None:
            raise ValueError("environment requests need a rollout worker built with tokenizer_spec")
        with self._lock:
            self._raise_if_failed()
            self._queue.extend(r for r in requests if not (r.get("record") or {}).get("env"))
            self._wake.notify_all()
        if runner is not None:
            for request in episodes:
                runner.start(request)

    def collect(self, wait_s: float = 0.0) -> List[Sample]:
        """Finished samples since the last call; waits up to `wait_s` for at least one."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not self._done and not self._error and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._have_done.wait(left)
            self._raise_if_failed()
            out, self._done = self._done, []
            return out

    def _raise_if_failed(self):
        if self._error:
            raise RuntimeError(f"rollout worker {self.index} failed:\n{self._error}")

    # ----- weights -------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.engine.version

    def stage_weights(self, tensors: Dict[str, torch.Tensor], version: int) -> None:
        """Hand over new weights; the loop applies them between two engine steps."""
        with self._lock:
            self._staged = (tensors, version)
            self._wake.notify_all()

    def load_weights(self, tensors: Dict[str, torch.Tensor], version: int) -> int:
        """Object-store path: the tensors arrive as this call's argument."""
        self.stage_weights({k: v.to(self.device) for k, v in tensors.items()}, version)
        return version

    def join_sync_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> int:
        """Join (or, after a member died, re-join) the weight-sync group."""
        if self._sync is not None:
            self._sync.close()
        self._sync = WeightSyncGroup(host, port, rank, world_size, backend)
        return rank

    def receive_broadcast(self) -> dict:
        """One push from the trainer over the sync group (blocks this call's thread, not generation)."""
        if self._sync is None:
            raise RuntimeError("receive_broadcast before join_sync_group")
        start = time.perf_counter()
        tensors, version = receive_state(self._sync, self.spec, self.cfg.sync_bucket_mb)
        self.stage_weights(tensors, version)
        return {"version": version, "receive_s": time.perf_counter() - start}

    def wait_for_version(self, version: int, timeout_s: float = 600.0) -> int:
        """Block until the loop has applied weights of at least `version` (tests, evaluation)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.engine.version < version:
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout worker {self.index} did not reach version {version}")
                self._have_done.wait(0.05)
            return self.engine.version

    # ----- the loop ------------------------------------------------------------------------------------------
    def _loop(self):
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    staged, self._staged = self._staged, None
                if staged is not None:
                    self._apply(*staged)
                self._admit()
                if self.engine.has_unfinished():
                    start = time.perf_counter()
                    results = self.engine.step()
                    self._counters["busy_s"] += time.perf_counter() - start
                    if results:
                        self._finish(results)
                else:
                    start = time.perf_counter()
                    with self._lock:
                        if not self._staged and not self._admissible() and not self._stopping:
                            self._wake.wait(0.05)
                    self._counters["idle_s"] += time.perf_counter() - start
        except Exception:  # noqa: BLE001 - surfaced to the driver by the next submit / collect
            with self._lock:
                self._error = traceback.format_exc()
                self._have_done.notify_all()

    def _apply(self, tensors, version):
        if version == self.engine.version:
            return  # a push repeated for a replaced worker: these weights are loaded already
        start = time.perf_counter()
        self.engine.update_weights(tensors, version)
        self._counters["stall_s"] += time.perf_counter() - start
        self._counters["updates"] += 1
        with self._lock:
            self._have_done.notify_all()  # wake wait_for_version

    def _admissible(self) -> bool:
        version = self.engine.version
        return bool(self._queue) and version != NO_WEIGHTS and self._queue[0]["min_version"] <= version

    def _admit(self):
        with self._lock:
            ready = []
            while self._admissible():
                ready.append(self._queue.popleft())
        for req in ready:
            params = self.sampling_params(req)
            rid = req.get("rid") or ":".join(
                str(x) for x in (req.get("kind", "train"), req["group_id"], req["sample_index"], req.get("attempt"))
            )
            self._meta[rid] = req
            self.engine.add_request(req["prompt_ids"], params, request_id=rid)

    def sampling_params(self, req: dict) -> SamplingParams:
        """rl.rollout.sampling for a training request; an evaluation request samples the plain distribution (no
        top-p / top-k) at its own temperature (default greedy). Either may bring its own max_new_tokens."""
        sampling = self.cfg.sampling
        eval_mode = req.get("kind") == "eval"
        return replace(
            sampling,
            temperature=req.get("temperature", 0.0 if eval_mode else sampling.temperature),
            top_p=1.0 if eval_mode else sampling.top_p,
            top_k=0 if eval_mode else sampling.top_k,
            max_new_tokens=req.get("max_new_tokens", sampling.max_new_tokens),
            stop_token_ids=tuple(sampling.stop_token_ids) + self.stop_token_ids,
            seed=req.get("seed"),
        )

    def _finish(self, results):
        samples = []
        for r in results:
            req = self._meta.pop(r.request_id)
            self._counters["generated_tokens"] += len(r.token_ids)
            if r.finish_reason == "abort":
                continue  # dropped by the driver (drop_requests)
            if self.episodes is not None and self.episodes.owns(r.request_id):
                self.episodes.on_generated(r)  # one turn of an episode: its environment answers
                continue
            samples.append(
                Sample(
                    group_id=req["group_id"],
                    sample_index=req["sample_index"],
                    prompt_ids=list(req["prompt_ids"]),
                    completion_ids=list(r.token_ids),
                    logprobs=[float(x) for x in r.logprobs],
                    versions=[int(v) for v in r.versions],
                    finish_reason=r.finish_reason or "length",
                    routes=r.routes,
                    meta={"kind": req.get("kind", "train"), "worker": self.index, "attempt": req.get("attempt")},
                )
            )
            self._counters["finished"] += 1
        with self._lock:
            self._done.extend(samples)
            self._have_done.notify_all()

    def _enqueue_turn(self, request: dict) -> None:
        with self._lock:
            self._queue.append(request)
            self._wake.notify_all()

    def _deliver_episode(self, sample: Sample) -> None:
        with self._lock:
            self._counters["finished"] += 1
            self._done.append(sample)
            self._have_done.notify_all()

    def drop_requests(self, kind: str = "train") -> int:
        """Forget every request of `kind` (queued ones, and running ones aborted): the driver abandoned their
        steps (a trainer restart goes back to a checkpoint). Returns how many running ones were aborted."""
        with self._lock:
            self._queue = deque(r for r in self._queue if r.get("kind", "train") != kind)
            self._done = [s for s in self._done if s.meta.get("kind") != kind]
            doomed = [rid for rid, req in self._meta.items() if req.get("kind", "train") == kind]
        return sum(self.engine.abort(rid) for rid in doomed)

    # ----- bookkeeping ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since the start (the driver takes differences): times, tokens, drafting."""
        s = self.engine.stats
        with self._lock:
            out = dict(self._counters)
            out.update(
                version=self.engine.version,
                queued=len(self._queue),
                running=len(self.engine.running),
                waiting=len(self.engine.waiting),
                verify_rows=s.verify_rows,
                verify_tokens=s.verify_tokens,
                drafted=list(s.drafted),
                accepted=list(s.accepted),
                undrafted_steps=s.undrafted_steps,
                draft_on=s.draft_on,
                expected_draft_speedup=s.expected_draft_speedup,
            )
        return out

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._have_done.notify_all()
        self._thread.join(timeout=30)
        if self.episodes is not None:
            self.episodes.close()
        if self._sync is not None:
            self._sync.close()


def episode_runner(worker: RolloutWorker, tokenizer_spec, max_seq_len: int):
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.rl.envs.episode import EpisodeLimits, EpisodeRunner

    cfg = worker.cfg
    limits = EpisodeLimits(
        max_turns=cfg.max_turns,
        max_new_tokens=cfg.sampling.max_new_tokens,
        max_episode_tokens=cfg.episode_tokens(),
        step_timeout_s=cfg.env_step_timeout_s,
        max_seq_len=max_seq_len,
    )
    return EpisodeRunner(
        load_tokenizer(tokenizer_spec), limits, worker._enqueue_turn, worker._deliver_episode, worker.index
    )
