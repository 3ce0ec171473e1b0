"""`build_runner`: the one object the trainer talks to; it owns the mesh, the sharded model parts and the schedule.

    runner = build_runner(model, model_cfg, parallel_cfg)
    result = runner.forward_backward(micro_batches)   # gradients accumulated, losses normalised globally
    norm = runner.clip_grad_norm_(1.0)
    optimizer.step(); runner.update_expert_bias(result["expert_load"])
    result = runner.forward_backward(micro_batches, loss_fn=my_loss)   # a caller's loss (GRPO) on the last stage
    result = runner.evaluate(micro_batches)           # forward only (validation), same result keys

A world of one process runs the same code with no mesh and no process group (plain forward/backward over the
micro-batches). See docs/INTERFACES.md ("train/parallel/ <-> the trainer").
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import LayoutError, ParallelConfig, check_microbatches, check_sequence, validate_layout
from .context import LossHook, ParallelContext
from .expert_parallel import apply_expert_parallel
from .grads import all_reduce_replicated_grads, all_reduce_shared_embedding_grads, clip_grad_norm_, parameters
from .mesh import build_groups, default_device
from .tensor_parallel import apply_tensor_parallel
from .pipeline import stage_ranks
from .stage import StageModule, split_model
from .wrapping import Sharder, initialise_unit, units, wrap_unit


class Runner:
    def __init__(
        self,
        *,
        stages: list,
        stage_ids: list,
        groups,
        ctx: ParallelContext,
        pc: ParallelConfig,
        model_cfg,
        fsdp_modules: list,
        device: torch.device,
        compute_dtype: torch.dtype = torch.float32,
        activation_dtype: Optional[torch.dtype] = None,
    ):
        self.stages = stages
        self.stage_ids = stage_ids
        self.groups = groups
        self.ctx = ctx
        self.parallel_cfg = pc
        self.model_cfg = model_cfg
        self.layout = groups.layout
        self.device = device
        self.compute_dtype = compute_dtype  # the mixed-precision compute dtype (wrapping.py)
        # what flows between pipeline stages (None: the parameters' dtype)
        self.activation_dtype = activation_dtype
        self._fsdp_modules = list(fsdp_modules)
        self._fsdp = bool(fsdp_modules)
        self._schedules: dict = {}
        self._checked_seq_lens: set = set()
        self._hooked = False  # the last step ran a caller's loss_fn
        self._comm_seconds = 0.0  # in blocking collectives since take_comm_seconds() (the trainer's step breakdown)
        # the embedding of the first / last stage when both hold one (MTP under PP, stage.py), and the group of
        # the two ranks that sum its gradient
        self.shared_embedding, self.embedding_copy, self.embedding_group = None, None, None
        if self.layout.pp > 1 and model_cfg.mtp_depths:
            self.embedding_group = _embedding_group(self.groups)
            for stage, stage_id in zip(stages, stage_ids):
                if stage_id in (0, self.layout.num_stages - 1):
                    self.shared_embedding = stage.part.backbone.embeddings.weight
                    if stage_id != 0:
                        self.embedding_copy = self.shared_embedding

    # ----- the contract -------------------------------------------------------------------------------------------
    @property
    def model_parts(self) -> list:
        """The model parts this rank owns (unsharded-model names; DTensor parameters when sharded)."""
        return [stage.part for stage in self.stages]

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def is_metrics_rank(self) -> bool:
        return self.groups.is_metrics_rank

    @property
    def mesh(self):
        return self.groups.mesh

    def forward_backward(
        self, micro_batches: list, loss_fn=None, replay_routes: bool = False, context_parallel: bool = True
    ) -> dict:
        """Forward and backward of every micro-batch; returns the global batch's losses (same on every rank).

        `micro_batches`: this data-parallel rank's share of the global batch (full sequences); every rank of a
        data-parallel group passes the same number of micro-batches, ranks sharing a dp_rank the same ones.

        `loss_fn(output, micro_batch_local) -> (loss, stats)`, when given, replaces the LM/MTP head losses on the
        last pipeline stage: `output` is a context.TrunkOutput (final hidden state of this rank's tokens, lm_head
        weight, model part, MTP embeddings and shifted labels, seq_idx) and `micro_batch_local` the micro-batch
        with every (b, s, ...) tensor sliced to this rank's tokens like input_ids. The loss must be this
        micro-batch's share of the global batch loss (gradients are summed over micro-batches and ranks, never
        averaged); stats are 0-dim tensors, summed over micro-batches and ranks (keys ending in `_max`: maximum).
        The MoE balance loss is still added by the runner.

        A micro-batch may carry `routes` (b, s, trunk MoE layers, top_k), the experts a rollout chose: the result's
        stats then count `router_agree_sum` / `router_pairs` (real tokens x layers where the router's own top-k set
        equals the recorded one), and with `replay_routes` every trunk MoE layer uses the recorded experts.

        Without `context_parallel` (train.seq_len_schedule's cp: false) the step runs without CP: every CP rank
        passes whole sequences of its own, like a data-parallel rank (ranks sharing a dp_rank and a cp_rank the same
        ones), the losses are normalised over dp x cp, and the gradients, summed over dp x cp as always, stay exact."""
        self._run(micro_batches, loss_fn, backward=True, replay_routes=replay_routes, context_parallel=context_parallel)
        with self._timed_collective():
            all_reduce_replicated_grads(self.model_parts, self.groups.tp_group)
            all_reduce_shared_embedding_grads(self.shared_embedding, self.embedding_group)
        return self._result()

    def take_comm_seconds(self):
        """Seconds spent in the runner's blocking collectives (replicated-gradient all-reduce, loss statistics)
        since the last call; None on one process. The FSDP collectives overlap the backward and are not in it."""
        if not self.groups.distributed:
            return None
        seconds, self._comm_seconds = self._comm_seconds, 0.0
        return seconds

    @contextlib.contextmanager
    def _timed_collective(self):
        if not self.groups.distributed:
            yield
            return
        # on GPU the collectives are asynchronous: synchronise so their own time is what is measured
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._comm_seconds += time.perf_counter() - started

    def evaluate(self, micro_batches: list, loss_fn=None, replay_routes: bool = False) -> dict:
        """Forward only (no gradient, .grad untouched): the same result as forward_backward on these batches."""
        try:
            with torch.no_grad():
                self._run(micro_batches, loss_fn, backward=False, replay_routes=replay_routes)
        finally:
            for module in self._fsdp_modules:  # the root keeps its parameters gathered after a forward
                module.reshard()
        comm_seconds = self._comm_seconds  # a validation pass is no part of the training step's breakdown
        result = self._result()
        self._comm_seconds = comm_seconds
        return result

    def _run(
        self,
        micro_batches: list,
        loss_fn: Optional[LossHook],
        backward: bool,
        replay_routes: bool = False,
        context_parallel: bool = True,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, micro_batch) -> (loss, stats), got {loss_fn!r}")
        ctx = self.ctx
        ctx.context_parallel = context_parallel
        ctx.prepare(micro_batches, labels_required=loss_fn is None)
        seq_len = ctx.micro_batches[0].seq_len
        if (seq_len, context_parallel) not in self._checked_seq_lens:
            from latentforge.train.seq_schedule import without_cp

            check_sequence(
                self.model_cfg, self.parallel_cfg if context_parallel else without_cp(self.parallel_cfg), seq_len
            )
            self._checked_seq_lens.add((seq_len, context_parallel))
        n = len(micro_batches)
        ctx.loss_fn, ctx.replay_routes = loss_fn, replay_routes
        self._hooked = loss_fn is not None
        try:
            if self.layout.pp == 1:
                stage = self.stages[0]
                for i in range(n):
                    if self._fsdp and backward:
                        stage.set_requires_gradient_sync(i == n - 1)
                    loss = stage(torch.tensor([i], device=self.device))
                    if backward:
                        loss.sum().backward()
            else:
                check_microbatches(n, self.parallel_cfg)
                first = ctx.micro_batches[0]
                if any(mb.ids_local.shape != first.ids_local.shape for mb in ctx.micro_batches):
                    raise LayoutError(
                        "forward_backward: pipeline parallelism needs every micro-batch of a step to "
                        "have the same (batch, sequence) shape; pad or drop the uneven one"
                    )
                ids = torch.arange(n, device=self.device)
                schedule = self._schedule(n, first.ids_local.shape)
                if backward:
                    schedule.step(ids, target=ids, return_outputs=False)
                else:
                    schedule.eval(ids, target=ids)
        finally:
            ctx.loss_fn, ctx.replay_routes = None, False

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm over every shard and stage; scales the gradients when it exceeds `max_norm`."""
        stage_size = self.layout.world_size // self.layout.pp
        return clip_grad_norm_(self.model_parts, max_norm, stage_size, copy=self.embedding_copy)

    def update_expert_bias(self, expert_load: torch.Tensor) -> None:
        """Aux-loss-free balancing of the MoE layers this rank owns (rows of `expert_load` by global MoE index)."""
        rate = self.model_cfg.expert_bias_update_rate
        for part in self.model_parts:
            for row, moe in part.moe_rows():
                moe.update_bias(expert_load[row], rate)

    # ----- internals --------------------------------------------------------------------------------------------------
    def _result(self) -> dict:
        ctx = self.ctx
        depths = self.model_cfg.mtp_depths
        hooked = self._hooked
        keys = self._stat_keys() if hooked else []
        sum_keys = [k for k in keys if not k.endswith("_max")]
        max_keys = [k for k in keys if k.endswith("_max")]
        zero = ctx.stat_custom.new_zeros(())
        custom_sums = torch.stack([ctx.custom_stats.get(k, zero) for k in sum_keys] or [zero])
        # a pipeline stage without the hook holds no value: -inf never wins the maximum
        custom_max = torch.stack([ctx.custom_stats.get(k, zero - float("inf")) for k in max_keys] or [zero])
        stats = torch.cat(
            [
                ctx.stat_lm.view(1),
                ctx.stat_mtp,
                ctx.stat_aux.view(1),
                ctx.stat_custom.view(1),
                custom_sums,
                ctx.load.flatten(),
            ]
        )
        if self.groups.distributed:
            # the ranks of one pipeline stage hold different tokens and only the last stage adds losses and stats,
            # so a sum (a maximum) over the world is the global batch's
            with self._timed_collective():
                dist.all_reduce(stats)
                if max_keys:
                    dist.all_reduce(custom_max, op=dist.ReduceOp.MAX)
        lm = stats[0]
        mtp = stats[1 : 1 + depths]
        aux = stats[1 + depths]
        custom = stats[2 + depths]
        custom_sums = stats[3 + depths : 3 + depths + custom_sums.numel()]
        load = stats[3 + depths + custom_sums.numel() :].view(-1, self.model_cfg.num_experts)[: ctx.num_moe]
        if hooked:
            loss = custom
        else:
            loss = lm
            if depths:
                loss = loss + self.model_cfg.mtp_loss_weight / depths * mtp.sum()
        if ctx.num_moe:
            loss = loss + self.model_cfg.moe_aux_loss_coeff * aux
        result = {
            "loss": float(loss),
            "lm_loss": None if hooked else float(lm),
            "mtp_losses": [] if hooked else [float(x) for x in mtp],
            "aux_loss": float(aux) if ctx.num_moe else None,
            "tokens": float(ctx.normalizers().targets),
            "expert_load": load.round().to(torch.long) if ctx.num_moe else None,
        }
        if hooked:
            result["stats"] = {**dict(zip(sum_keys, custom_sums.tolist())), **dict(zip(max_keys, custom_max.tolist()))}
        return result

    def _stat_keys(self) -> list:
        """The loss hook's statistic names, the same list on every rank (the ranks of non-last pipeline stages
        never call the hook, so they learn the names from the others)."""
        keys = sorted(self.ctx.custom_stats)
        if self.groups.distributed:
            gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, keys)
            keys = sorted({key for rank_keys in gathered for key in rank_keys})
        return keys

    def _schedule(self, n: int, local_shape):
        key = (n, tuple(local_shape))
        if key in self._schedules:
            self._schedules[key] = self._schedules.pop(key)  # most recently used last
            return self._schedules[key]
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        num_stages = self.layout.num_stages
        pipeline_stages = []
        for stage, stage_id in zip(self.stages, self.stage_ids):
            inputs, outputs = self._stage_metas(stage_id, local_shape)
            pipeline_stages.append(
                PipelineStage(
                    stage,
                    stage_id,
                    num_stages,
                    self.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=self.groups.pp_group,
                )
            )
        kind = self.parallel_cfg.pp_schedule
        common: dict[str, Any] = dict(n_microbatches=n, loss_fn=_stage_loss, scale_grads=False)
        if kind == "interleaved_1f1b":
            schedule = ScheduleInterleaved1F1B(pipeline_stages, **common)
        elif kind == "gpipe":
            schedule = ScheduleGPipe(pipeline_stages[0], **common)
        else:
            schedule = Schedule1F1B(pipeline_stages[0], **common)
        # a schedule's stages keep receive/gradient buffers of their shape: keep the two newest shapes only (a
        # step-by-step varying shape, e.g. GRPO's padded batches, would otherwise grow memory without bound)
        while len(self._schedules) >= 2:
            self._schedules.pop(next(iter(self._schedules)))
        self._schedules[key] = schedule
        return schedule

    def _stage_metas(self, stage_id: int, local_shape):
        """Shapes of what each stage receives and sends (given up front: no shape-inference forward, which would
        run the stage's collectives on empty tensors): (mb index, hidden), the loss at the end (the last stage
        embeds the MTP depths' tokens itself: stage.py)."""
        dtype = self.activation_dtype or next(self.model_parts[0].parameters()).dtype
        index = torch.empty(1, dtype=torch.long, device="meta")
        hidden = torch.empty(
            *local_shape, self.model_cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True
        )  # float activations carry gradients back
        between = (index, hidden)
        inputs = (index,) if stage_id == 0 else between
        last = stage_id == self.layout.num_stages - 1
        loss_dtype = torch.promote_types(dtype, torch.float32)
        outputs = (torch.empty(1, dtype=loss_dtype, device="meta", requires_grad=True),) if last else between
        return inputs, outputs


def _embedding_group(groups):
    """The process group of the first and the last pipeline rank of this rank's pipeline (the pp group itself when
    pp == 2). Every rank creates every such group, in the same order (torch.distributed.new_group's contract)."""
    pp = groups.layout.pp
    if pp == 2:
        return groups.pp_group
    mine = None
    pipelines = groups.mesh.mesh.reshape(pp, -1).T.tolist()  # the global ranks of each pipeline, stage order
    for ranks in pipelines:
        group = dist.new_group([ranks[0], ranks[-1]])
        if groups.rank in (ranks[0], ranks[-1]):
            mine = group
    return mine


def _stage_loss(output, target):
    # the last stage already computed its (globally normalised) partial loss
    return output.sum()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_runner(model, model_cfg, parallel_cfg=None, precision=None) -> Runner:
    """Validate the layout for the launched world, build the mesh, split and shard `model` (in place), and
    return the runner. `parallel_cfg`: a ParallelConfig, a dict or the recipe's `parallel` node (None: defaults).
    `precision`: the recipe's PrecisionConfig (or dict / None: defaults); its param_dtype / reduce_dtype pick the
    mixed precision of the forward/backward (wrapping.py; "auto": bf16 on GPU, fp32 on CPU).

    `model` may be built on the meta device: each unit (embedding, block, final norm, lm_head, MTP block) is then
    allocated and initialised (HybridModel's init, seeded by torch.initial_seed() + unit index, so the values do
    not depend on the layout) right before it is sharded, so the full model never exists on one rank."""
    pc = parallel_cfg if isinstance(parallel_cfg, ParallelConfig) else ParallelConfig.from_dict(parallel_cfg)
    layout = validate_layout(model_cfg, pc, _world_size())
    device = default_device()
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and any(not p.is_meta for p in model.parameters()):
        raise LayoutError(
            "build_runner: the model is partly on the meta device; build it entirely on the meta "
            "device (or entirely on a real one)"
        )
    if not on_meta:
        model.to(device)
    groups = build_groups(layout, device.type)
    base_seed = torch.initial_seed()
    if groups.distributed:
        if on_meta:
            base_seed = _agreed_seed(device)
        else:
            _check_same_model(model, device)
    ctx = ParallelContext(
        groups, model_cfg, device, load_balance=pc.cp_load_balance, attention_block=pc.attention_block
    )

    ctx.num_moe, ctx.num_trunk_moe = len(model.moe_layers()), len(model.trunk_moe_index)
    ctx.reset_step()

    num_stages = layout.num_stages
    if layout.pp == 1:
        stage_ids, parts = [0], [model]
    else:
        owner = stage_ranks(num_stages, layout.pp)
        stage_ids = [s for s in range(num_stages) if owner[s] == groups.pp_rank]
        parts = split_model(model, layout.stage_layers, stage_ids)

    # every rank built the same model (same seed), so shards can be cut locally when it was initialised here
    src = None if on_meta else 0
    tp_mesh = groups.sub("tp") if layout.tp > 1 else None
    ep_mesh = groups.sub("ep") if layout.ep > 1 else None
    checkpointed = pc.checkpointed_kinds()
    precision = _precision_config(precision)
    compute_dtype = precision.compute_dtype(device.type)
    sharder = Sharder(groups, pc.fsdp_reshard_after_forward, compute_dtype, precision.gradient_reduce_dtype())
    stages = []
    for stage_id, part in zip(stage_ids, parts):
        for index, kind, unit in units(part):
            if on_meta:
                initialise_unit(index, kind, unit, model_cfg, device, base_seed)
            if tp_mesh is not None:
                apply_tensor_parallel(unit, tp_mesh, src)
            if ep_mesh is not None:
                apply_expert_parallel([unit], ep_mesh, src)
            wrap_unit(kind, unit, checkpointed, pc.compile)
            sharder.shard_unit(kind, unit)
        stage = StageModule(part, ctx, first=(stage_id == 0), last=(stage_id == num_stages - 1))
        sharder.shard_root(stage)
        stages.append(stage)
    runner = Runner(
        stages=stages,
        stage_ids=stage_ids,
        groups=groups,
        ctx=ctx,
        pc=pc,
        model_cfg=model_cfg,
        fsdp_modules=sharder.modules,
        device=device,
        compute_dtype=compute_dtype,
        activation_dtype=sharder.activation_dtype(next(model.parameters()).dtype),
    )
    return runner


def _precision_config(precision):
    from latentforge.train.precision import PrecisionConfig

    if precision is None or isinstance(precision, PrecisionConfig):
        return precision or PrecisionConfig()
    return PrecisionConfig.from_dict(precision)


def _agreed_seed(device) -> int:
    """Global rank 0's torch.initial_seed(), so every rank initialises a meta-built model alike."""
    seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.long, device=device)
    dist.broadcast(seed, src=0)
    return int(seed)


@torch.no_grad()
def _check_same_model(model, device) -> None:
    """Every rank must start from the same weights (shards are cut from each rank's own copy)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for t in model.state_dict().values():
        if t.is_floating_point():
            total[0] += t.double().sum()
            total[1] += t.double().square().sum()
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise LayoutError(
            "build_runner: the model's weights differ between ranks; seed every rank the same "
            "(torch.manual_seed(seed)) before building it, or build it on the meta device and let the "
            "runner initialise it"
        )


def describe(runner: Runner) -> str:
    """One line per stage this rank owns: its layers and parameter count (for logs and --dry-run)."""
    lines = [runner.layout.describe()]
    for stage_id, part in zip(runner.stage_ids, runner.model_parts):
        layers = part.backbone.layers
        names = list(layers.keys()) if hasattr(layers, "keys") else [str(i) for i in range(len(layers))]
        count = sum(p.numel() for p in parameters([part]))
        lines.append(f"stage {stage_id}: layers {names[0]}..{names[-1]} ({len(names)}), {count:,} parameters")
    return "\n".join(lines)
