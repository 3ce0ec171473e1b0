"""The generation engine: continuous batching over fixed slots, MTP speculative decoding, in-flight weight updates.

    engine = Engine(model, EngineConfig(max_batch=16, max_seq_len=1024, draft_tokens=3))
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=256, seed=7))
    while engine.has_unfinished():
        for result in engine.step(): ...          # GenerationResult of the requests that finished this step
    engine.update_weights(state_dict, version=5)  # between two steps; running sequences carry on

One `step()`: waiting requests join free slots (prefill, or a copy of a cached prefill of the same prompt under
the same weight version) and get their first token; then every running row advances by one decode step, or by one
verify step of the k MTP drafts (1 to k+1 tokens). Rows that finish leave, the remaining rows are compacted to
slots 0..n-1 so each forward runs on exactly the live rows.

Every token records the weight version of the forward that chose it. `update_weights` copies new tensors into the
model between steps; policy "continue" keeps the running rows' caches (computed under the old weights),
"recompute" re-runs every running row's context under the new weights (main and MTP caches, drafts) before the
next token. Prefill states are reused only under the version that produced them.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import WEIGHT_UPDATE_POLICIES, EngineConfig, EngineStats, GenerationResult, SamplingParams
from .drafter import MTPDrafter
from .gate import DraftGate
from .runner import BATCHED_PREFILL_MAX_TOKENS, ModelRunner
from .sampling import greedy_accept, log_softmax_at, sample, sampling_probs, speculative_accept
from .state import SlotStates
from .transfer import to_device, to_host


@dataclass
class _Request:
    result: GenerationResult
    params: SamplingParams
    generator: torch.Generator
    sequence: list  # prompt + generated tokens
    processed: int = 0  # tokens the main model has consumed (the last generated token is not, yet)
    logits: list = field(default_factory=list)
    aborted: bool = False
    # trunk hidden states of tokens consumed by plain steps while drafting was gated off (the MTP caches catch up
    # on them when drafting resumes)
    pending_hidden: list = field(default_factory=list)
    # EngineConfig.record_routes: (tokens, MoE layers, top_k) chunks, one row per consumed token (`processed`)
    routes: list = field(default_factory=list)

    def uniforms(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator, dtype=torch.float64)


def _usable_outside_inference(result: GenerationResult) -> GenerationResult:
    """Tensors made under inference mode cannot enter autograd (route replay indexes with result.routes in a
    training forward); their clones can."""
    if result.logits is not None:
        result.logits = result.logits.clone()
    if result.routes is not None:
        result.routes = result.routes.clone()
    return result


class Engine:
    def __init__(self, model, config: Optional[EngineConfig] = None, version: Any = 0):
        self.model = model
        self.config = config or EngineConfig()
        self.version = version
        cfg = self.config
        k = cfg.draft_tokens
        if k and model.mtp is None:
            raise ValueError(
                "EngineConfig.draft_tokens > 0 needs a model with an MTP block (model.mtp_depths > 0); "
                "use draft_tokens=0 for plain decoding"
            )
        self.device = model.lm_head.weight.device
        self.vocab_size = model.cfg.vocab_size
        # verify steps write k+1 positions past the row's length, MTP catch-up up to 2k past it
        self.states = SlotStates(model, cfg.max_batch, cfg.max_seq_len + 3 * k + 2, draft_depths=k)
        self.runner = ModelRunner(model, self.states, record_routes=cfg.record_routes, compile=cfg.compile)
        self.drafter = MTPDrafter(self.runner, k, cfg.max_batch) if k else None
        self.gate = DraftGate(probe_interval=cfg.draft_probe_interval) if k and cfg.draft_gate else None
        self.temperature = torch.zeros(cfg.max_batch, dtype=torch.float64, device=self.device)
        self.top_p = torch.ones(cfg.max_batch, dtype=torch.float64, device=self.device)
        self.top_k = torch.zeros(cfg.max_batch, dtype=torch.long, device=self.device)
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []  # row i of the slot states is running[i]
        self.prefix_cache: OrderedDict = OrderedDict()
        self.stats = EngineStats(drafted=[0] * k, accepted=[0] * k)
        self._ids = itertools.count()
        self._lock = threading.RLock()

    # ----- requests ------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: Optional[SamplingParams] = None, request_id: Any = None) -> Any:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("add_request: the prompt is empty; give at least one token (e.g. the BOS id)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"add_request: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"add_request: prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds EngineConfig.max_seq_len={self.config.max_seq_len}; raise max_seq_len or lower "
                "max_new_tokens"
            )
        with self._lock:
            number = next(self._ids)
            request_id = number if request_id is None else request_id
            seed = params.seed if params.seed is not None else hash((self.config.seed, number)) & (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
            result = GenerationResult(request_id=request_id, prompt_ids=list(prompt))
            self.waiting.append(_Request(result, params, generator, list(prompt)))
        return request_id

    def abort(self, request_id) -> bool:
        """Stop a request; it comes back from the next step() with finish_reason "abort"."""
        with self._lock:
            for request in self.waiting + self.running:
                if request.result.request_id == request_id:
                    request.aborted = True
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, prompts, params=None) -> list:
        """Run prompts (lists of ids) to completion; params: one SamplingParams or one per prompt."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = {}
        while self.has_unfinished():
            for result in self.step():
                done[result.request_id] = result
        return [done[i] for i in ids]

    # ----- one engine step -----------------------------------------------------------------------------------
    def step(self) -> list:
        """Admit waiting requests, advance every running row once; return the results that finished."""
        # inference mode, not no_grad: no autograd bookkeeping per op (~15% of a CPU decode step); the tensors
        # handed out are cloned back into normal ones below
        with self._lock, torch.inference_mode():
            finished = self._drop_aborted()
            self._admit(finished)
            if self.running:
                drafter, gate = self.drafter, self.gate
                if drafter is None:
                    self._decode(finished)
                elif gate is None:
                    self._verify(finished, drafter)
                else:
                    self._gated_step(finished, drafter, gate)
                self.stats.steps += 1
        return [_usable_outside_inference(result) for result in finished]

    def _drop_aborted(self) -> list:
        finished = []
        for request in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(request)
            finished.append(self._finish(request, "abort"))
        if any(r.aborted for r in self.running):
            for request in self.running:
                if request.aborted:
                    finished.append(self._finish(request, "abort"))
            self._compact([not r.aborted for r in self.running])
        return finished

    def _admit(self, finished: list):
        free = self.config.max_batch - len(self.running)
        if free <= 0 or not self.waiting:
            return
        joining, self.waiting = self.waiting[:free], self.waiting[free:]
        # identical prompts: one prefill per distinct prompt, copied to the other rows. The first request of each
        # distinct prompt takes rows lo, lo+1, ... (prefilled together), the repeats the rows after them
        groups: dict = {}
        for request in joining:
            groups.setdefault(tuple(request.result.prompt_ids), []).append(request)
        lo = len(self.running)
        firsts = [group[0] for group in groups.values()]
        repeats = [request for group in groups.values() for request in group[1:]]
        for row, request in enumerate(firsts + repeats, start=lo):
            self.running.append(request)
            self._set_row_params(row, request.params)
        logits, hidden = self._prefill_rows(lo, list(groups))
        # row lo+i holds the prompt of firsts[source[i]]; a repeat's states and routes are its first's
        first_row = {id(first): i for i, first in enumerate(firsts)}
        source = list(range(len(firsts))) + [first_row[id(groups[tuple(r.result.prompt_ids)][0])] for r in repeats]
        for row in range(len(firsts), len(source)):
            original = firsts[source[row]]
            self.states.move_row(lo + source[row], lo + row, len(original.sequence))
            self.running[lo + row].routes = list(original.routes)
        self.stats.prefix_hits += len(repeats)
        joined = self.running[lo:]
        for request in joined:
            request.processed = len(request.sequence)
        index = to_device(source, self.device)
        row_logits = logits[index]
        tokens, logprobs = self._choose(row_logits, lo, joined)
        tokens, logprobs, kept_logits, _ = self._read_back(joined, tokens, logprobs, row_logits)
        for request, token, logprob, one_row in zip(joined, tokens.tolist(), logprobs.tolist(), kept_logits):
            self._emit(request, token, logprob, one_row)
        if self.drafter is not None:
            for row in range(lo, lo + len(joined)):
                self.drafter.reset_row(row)
            self.drafter.catch_up(
                lo,
                [r.sequence for r in joined],
                [r.processed for r in joined],
                hidden[index],
                self._draft_sampler(lo, len(joined)),
            )
        keep = [True] * len(self.running)
        for i, request in enumerate(self.running):
            reason = self._done_reason(request)
            if reason:
                finished.append(self._finish(request, reason))
                keep[i] = False
        if not all(keep):
            self._compact(keep)

    def _prefill_rows(self, lo: int, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """States of the distinct `prompts` (tuples) into rows lo, lo+1, ...: prefix-cache copies under this weight
        version, the others prefilled; the trunk MoE routes go to the requests in those rows. Returns (logits of
        each prompt's last token (m, V), hidden (m, L, H) right-padded to the longest prompt, zeros where no
        drafter needs it)."""
        m, longest = len(prompts), max(map(len, prompts))
        requests = self.running[lo : lo + m]
        logits = torch.empty(m, self.vocab_size, dtype=self.model.lm_head.weight.dtype, device=self.device)
        hidden = torch.zeros(m, longest, self.model.cfg.hidden_size, dtype=logits.dtype, device=self.device)
        missing = []
        for i, prompt in enumerate(prompts):
            cached = self.prefix_cache.get((self.version, prompt))
            if cached is None:
                missing.append(i)
                continue
            self.prefix_cache.move_to_end((self.version, prompt))
            snapshot, cached_logits, cached_hidden, routes = cached
            logits[i] = cached_logits
            self.states.load_row(lo + i, snapshot)
            if cached_hidden is not None:
                hidden[i, : len(prompt)] = cached_hidden[0]
            requests[i].routes = [routes] if routes is not None else []
            self.stats.prefix_hits += 1
        for block in self._prefill_blocks(missing, prompts):
            first = lo + block[0]
            texts = [list(prompts[i]) for i in block]
            if len(block) == 1:
                block_logits, block_hidden = self.runner.prefill(first, torch.tensor([texts[0]], device=self.device))
                block_routes = self.runner.prefill_routes
            else:
                block_logits, block_hidden, block_routes = self.runner.prefill_rows(first, texts)
            for j, i in enumerate(block):
                length = len(prompts[i])
                logits[i] = block_logits[j]
                hidden[i, :length] = block_hidden[j, :length]
                routes = self._routes_cpu(block_routes, j, length)
                requests[i].routes = [routes] if routes is not None else []
                self.stats.prefill_tokens += length
                if self.config.prefix_cache_size:
                    snapshot = self.states.snapshot_row(lo + i, length)
                    kept_hidden = block_hidden[j : j + 1, :length].clone() if self.drafter is not None else None
                    self.prefix_cache[(self.version, prompts[i])] = (snapshot, logits[i].clone(), kept_hidden, routes)
                    while len(self.prefix_cache) > self.config.prefix_cache_size:
                        self.prefix_cache.popitem(last=False)
        return logits, hidden

    @staticmethod
    def _prefill_blocks(missing: list, prompts: list) -> list:
        """Runs of adjacent missing rows prefilled together; a prompt longer than BATCHED_PREFILL_MAX_TOKENS goes
        alone through the chunked scan (the decode path's per-row decay matrices grow with the square of the
        length)."""
        blocks: list = []
        for i in missing:
            alone = len(prompts[i]) > BATCHED_PREFILL_MAX_TOKENS
            joins = blocks and blocks[-1][-1] == i - 1 and len(prompts[blocks[-1][0]]) <= BATCHED_PREFILL_MAX_TOKENS
            if joins and not alone:
                blocks[-1].append(i)
            else:
                blocks.append([i])
        return blocks

    def _gated_step(self, finished: list, drafter: MTPDrafter, gate: DraftGate):
        """A draft step or a plain one, as the gate decides from measured costs and the accepted length."""
        drafting = gate.choose()
        if drafting:
            self._resume_drafting(drafter)
        n, produced = len(self.running), self.stats.verify_tokens
        started = gate.clock()
        if drafting:
            self._verify(finished, drafter)
            produced = self.stats.verify_tokens - produced
        else:
            self._decode(finished, keep_hidden=True)
            produced = n
            self.stats.undrafted_steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        gate.record(drafting, gate.clock() - started, rows=n, tokens=produced)
        self.stats.draft_on = drafting
        self.stats.expected_draft_speedup = gate.expected_speedup()

    def _resume_drafting(self, drafter: MTPDrafter):
        """MTP caches and drafts of the rows decoded plainly since their last catch-up, in runs of adjacent rows."""
        stale = [bool(r.pending_hidden) for r in self.running]
        row = 0
        while row < len(stale):
            if not stale[row]:
                row += 1
                continue
            end = row
            while end < len(stale) and stale[end]:
                end += 1
            requests = self.running[row:end]
            width = max(len(r.pending_hidden) for r in requests)
            padded = [
                torch.stack(r.pending_hidden + [r.pending_hidden[-1]] * (width - len(r.pending_hidden)))
                for r in requests
            ]
            drafter.catch_up(
                row,
                [r.sequence for r in requests],
                [r.processed for r in requests],
                torch.stack(padded),
                self._draft_sampler(row, len(requests)),
            )
            for request in requests:
                request.pending_hidden = []
            row = end

    def _decode(self, finished: list, keep_hidden: bool = False):
        ids, pos, positions = self._step_inputs()
        out = self.runner.step(ids, pos, max(positions), keep_positions=False)
        logits = out.logits[:, 0]
        if keep_hidden:
            for request, hidden in zip(self.running, out.hidden[:, 0]):
                request.pending_hidden.append(hidden)
        tokens, logprobs = self._choose(logits, 0, self.running)
        tokens, logprobs, kept_logits, routes = self._read_back(self.running, tokens, logprobs, logits, out.routes)
        keep = []
        for i, (request, token, logprob, row_logits) in enumerate(
            zip(self.running, tokens.tolist(), logprobs.tolist(), kept_logits)
        ):
            self._keep_routes(request, routes, i, 1)
            request.processed += 1
            self._emit(request, token, logprob, row_logits)
            reason = self._done_reason(request)
            if reason:
                finished.append(self._finish(request, reason))
            keep.append(not reason)
        if not all(keep):
            self._compact(keep)

    def _verify(self, finished: list, drafter: MTPDrafter):
        """Main model over [next token, k drafts] per row, acceptance, rollback, MTP catch-up for the next drafts."""
        n, k = len(self.running), self.config.draft_tokens
        rows = slice(0, n)
        pending, pos, positions = self._step_inputs()
        ids = torch.cat([pending, drafter.drafts[rows]], dim=1)
        out = self.runner.step(ids, pos, max(positions), keep_positions=True)

        drafts = drafter.drafts[rows]
        if self._all_greedy(rows):
            accepted, next_tokens = greedy_accept(out.logits, drafts)
        else:
            per_position = lambda t: t[rows].repeat_interleave(k + 1)  # noqa: E731
            probs = sampling_probs(
                out.logits.reshape(n * (k + 1), -1),
                per_position(self.temperature),
                per_position(self.top_k),
                per_position(self.top_p),
                cut=self._any_cut(self.running),
                any_greedy=not self._all_sampled(self.running),
            ).view(n, k + 1, -1)
            uniforms = to_device(torch.stack([r.uniforms(k + 1) for r in self.running]), self.device)
            draft_probs = drafter.draft_distributions(n, probs.shape[-1], probs.dtype)
            accepted, next_tokens = speculative_accept(probs, draft_probs, drafts, uniforms[:, :k], uniforms[:, k])
        self.runner.commit(out, accepted)  # Mamba/conv states after the last accepted token

        # emitted tokens per row: the accepted drafts, then the correction / bonus token
        emitted = torch.cat([drafts, next_tokens[:, None]], dim=1)
        emitted = torch.where(
            torch.arange(k + 1, device=self.device)[None, :] == accepted[:, None], next_tokens[:, None], emitted
        )
        logprobs = log_softmax_at(out.logits, emitted)  # greedy rows report the plain softmax
        if not self._all_greedy(rows):
            sampled = probs.gather(-1, emitted.unsqueeze(-1)).squeeze(-1).log()
            logprobs = torch.where(self.temperature[rows, None] > 0, sampled, logprobs.to(sampled.dtype))
        # the step's one read-back: what the host needs to emit tokens and decide who finished
        counted = torch.cat([accepted[:, None], emitted], dim=1)  # per row: accepted drafts, then emitted tokens
        counted, logprobs, kept_logits, routes = self._read_back(
            self.running, counted, logprobs, out.logits, out.routes
        )
        rows_back = counted.tolist()
        counts, emitted_list = [row[0] for row in rows_back], [row[1:] for row in rows_back]
        logprob_list = logprobs.tolist()
        self.stats.verify_rows += n
        self.stats.verify_tokens += sum(counts) + n
        for depth in range(k):
            self.stats.drafted[depth] += n
            self.stats.accepted[depth] += sum(1 for c in counts if c > depth)

        keep = []
        for i, request in enumerate(self.running):
            # the pending token and the accepted drafts are consumed now (rejected drafts' routes are dropped; the
            # correction / bonus token is routed by the step that consumes it)
            self._keep_routes(request, routes, i, counts[i] + 1)
            request.processed += counts[i] + 1
            for j in range(counts[i] + 1):
                row_logits = kept_logits[i]
                self._emit(
                    request, emitted_list[i][j], logprob_list[i][j], None if row_logits is None else row_logits[j]
                )
                if self._done_reason(request):
                    break
            reason = self._done_reason(request)
            if reason:
                finished.append(self._finish(request, reason))
            keep.append(not reason)
        survivors = [i for i, kept in enumerate(keep) if kept]
        if not all(keep):
            self._compact(keep)
        if survivors:
            m = len(survivors)
            index = to_device(survivors, self.device)
            trunk = out.hidden[index, : max(counts[i] for i in survivors) + 1]
            drafter.catch_up(
                0,
                [r.sequence for r in self.running],
                [r.processed for r in self.running],
                trunk,
                self._draft_sampler(0, m),
            )

    # ----- helpers -------------------------------------------------------------------------------------------
    def _all_greedy(self, rows: slice) -> bool:
        return all(request.params.greedy for request in self.running[rows])

    @staticmethod
    def _all_sampled(requests: list) -> bool:
        return not any(request.params.greedy for request in requests)

    def _any_cut(self, requests: list) -> bool:
        """Whether a sampled row has a top-k or top-p cut (known from the requests, not read from the device)."""
        vocab = self.vocab_size
        return any(not r.params.greedy and (0 < r.params.top_k < vocab or r.params.top_p < 1) for r in requests)

    def _step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The running rows' pending tokens (n, 1) and positions (n,), sent in one copy; positions as a list."""
        positions = [r.processed for r in self.running]
        both = to_device([[r.sequence[-1] for r in self.running], positions], self.device)
        return both[0, :, None], both[1], positions

    def _read_back(self, requests: list, tokens, logprobs, logits, routes=None) -> tuple:
        """The step's tokens and log-probs on the host, with the logits only when a request keeps them and the
        routes only when recorded, in one wait for the device. Rows of logits it does not copy stay None."""
        wanted = [tokens, logprobs]
        keep_logits = any(request.params.return_logits for request in requests)
        if keep_logits:
            wanted.append(logits.detach().float())
        if routes is not None:
            wanted.append(routes)
        host = to_host(*wanted)
        # per request: its rows of logits on the host, or None
        kept_logits = list(host[2]) if keep_logits else [None] * len(requests)
        return host[0], host[1], kept_logits, host[-1] if routes is not None else None

    def _sample_rows(
        self, logits: torch.Tensor, lo: int, requests: list
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Sample one token per row from logits (m, V) of slot rows lo..lo+m-1.

        Returns (tokens, probs): probs is None when every row is greedy (no distribution is built)."""
        rows = slice(lo, lo + len(requests))
        if self._all_greedy(rows):
            return logits.argmax(-1), None
        probs = sampling_probs(
            logits,
            self.temperature[rows],
            self.top_k[rows],
            self.top_p[rows],
            cut=self._any_cut(requests),
            any_greedy=not self._all_sampled(requests),
        )
        uniforms = to_device(torch.stack([r.uniforms(1) for r in requests]), self.device)
        return sample(probs, uniforms[:, 0]), probs

    def _choose(self, logits: torch.Tensor, lo: int, requests: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, logprobs) of rows lo..lo+m-1: greedy rows report the plain softmax, sampled rows the
        sampling distribution's probability."""
        tokens, probs = self._sample_rows(logits, lo, requests)
        if probs is None:
            return tokens, log_softmax_at(logits, tokens)
        logprobs = probs.gather(-1, tokens[:, None]).squeeze(-1).log()
        if not self._all_sampled(requests):
            greedy = self.temperature[lo : lo + len(requests)] <= 0
            logprobs = torch.where(greedy, log_softmax_at(logits, tokens).to(logprobs.dtype), logprobs)
        return tokens, logprobs

    def _draft_sampler(self, lo: int, m: int):
        requests = self.running[lo : lo + m]

        def draw(logits, depth):
            return self._sample_rows(logits, lo, requests)

        return draw

    def _set_row_params(self, row: int, params: SamplingParams):
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k

    def _emit(self, request: _Request, token: int, logprob: float, logits: Optional[torch.Tensor]):
        """logits: the token's row on the host when the request keeps logits (`_read_back`), else None."""
        result = request.result
        request.sequence.append(token)
        result.token_ids.append(token)
        result.logprobs.append(logprob)
        result.versions.append(self.version)
        if request.params.return_logits:
            assert logits is not None, "_read_back copies the logits when a request keeps them"
            request.logits.append(logits.clone())
        self.stats.generated_tokens += 1

    @staticmethod
    def _done_reason(request: _Request) -> Optional[str]:
        result = request.result
        if result.token_ids and result.token_ids[-1] in request.params.stop_token_ids:
            return "stop"
        if len(result.token_ids) >= request.params.max_new_tokens:
            return "length"
        return None

    def _finish(self, request: _Request, reason: str) -> GenerationResult:
        result = request.result
        result.finish_reason = reason
        if request.logits:
            result.logits = torch.stack(request.logits)
        if self.config.record_routes:
            result.routes = self._finished_routes(request)
        return result

    @staticmethod
    def _routes_cpu(routes: Optional[torch.Tensor], row: int, count: int) -> Optional[torch.Tensor]:
        return None if routes is None else routes[row, :count].to("cpu", copy=True)

    def _keep_routes(self, request: _Request, routes: Optional[torch.Tensor], row: int, count: int):
        """Routes of the first `count` tokens fed for slot row `row` (recording on and the trunk has MoE layers)."""
        if routes is not None:
            request.routes.append(self._routes_cpu(routes, row, count))

    def _finished_routes(self, request: _Request) -> torch.Tensor:
        if not request.routes:  # aborted before its prefill, or a trunk without MoE layers
            return torch.zeros(request.processed, 0, 0, dtype=torch.long)
        # a stop or max_new_tokens inside an accepted draft: the drafts fed after the last emitted token are cut
        return torch.cat(request.routes)[: len(request.sequence) - 1]

    def _compact(self, keep: list):
        """Drop rows whose keep is False; survivors move down to rows 0..m-1 in order (never onto a live row)."""
        survivors = [i for i, kept in enumerate(keep) if kept]
        for dst, src in enumerate(survivors):
            if src == dst:
                continue
            request = self.running[src]
            mtp_lengths = self.drafter.cache_lengths(src) if self.drafter is not None else ()
            self.states.move_row(src, dst, request.processed, mtp_lengths)
            if self.drafter is not None:
                self.drafter.move_row(src, dst)
            self.temperature[dst] = self.temperature[src]
            self.top_p[dst] = self.top_p[src]
            self.top_k[dst] = self.top_k[src]
        self.running = [self.running[i] for i in survivors]

    # ----- weights -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def update_weights(self, tensors: dict, version: Any, policy: Optional[str] = None, partial: bool = False):
        """Load new weights between two steps without dropping the running sequences.

        tensors: {state-dict name: tensor} in the model's names (`model.state_dict()` / INTERFACES.md); all of
        them unless `partial` (e.g. one bucket of a chunked broadcast). version: stamped on every later token.
        policy: "continue" (keep the caches computed under the old weights) or "recompute" (re-run every running
        context under the new ones); default EngineConfig.weight_update_policy.
        """
        policy = policy or self.config.weight_update_policy
        if policy not in WEIGHT_UPDATE_POLICIES:
            raise ValueError(f"update_weights: policy must be one of {WEIGHT_UPDATE_POLICIES}, got {policy!r}")
        with self._lock:
            targets = self.model.state_dict(keep_vars=True)
            unknown = sorted(set(tensors) - set(targets))
            if unknown:
                raise KeyError(
                    f"update_weights: unknown tensor names {unknown[:5]}; expected the model's "
                    "state-dict names (e.g. 'backbone.layers.0.mixer.in_proj.weight')"
                )
            missing = sorted(set(targets) - set(tensors))
            if missing and not partial:
                raise KeyError(
                    f"update_weights: {len(missing)} tensors missing (e.g. {missing[:3]}); send all of "
                    "them, or pass partial=True for a subset"
                )
            for name, value in tensors.items():
                if tuple(value.shape) != tuple(targets[name].shape):
                    raise ValueError(
                        f"update_weights: {name} has shape {tuple(value.shape)}, the model's is "
                        f"{tuple(targets[name].shape)}"
                    )
            for name, value in tensors.items():
                targets[name].data.copy_(value)
            self.version = version
            self.prefix_cache.clear()  # states of the old weights must never be served as the new ones'
            if policy == "recompute":
                self._recompute_running()

    def _recompute_running(self):
        for row, request in enumerate(self.running):
            context = torch.tensor([request.sequence[: request.processed]], dtype=torch.long, device=self.device)
            _, hidden = self.runner.prefill(row, context)
            if self.config.record_routes:
                request.routes = []
                self._keep_routes(request, self.runner.prefill_routes, 0, request.processed)
            self.stats.prefill_tokens += request.processed
            request.pending_hidden = []
            if self.drafter is not None:
                self.drafter.reset_row(row)
                self.drafter.catch_up(row, [request.sequence], [request.processed], hidden, self._draft_sampler(row, 1))
