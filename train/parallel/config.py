"""The parallel layout of a run (`ParallelConfig`) and its validation against the model and the world.

`validate_layout` is a pure function (no process group): every layout that cannot work fails here, at start, with
a message naming the dimension, the sizes involved and a fix.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp. The world size is their product
(`dp_shard = -1` takes what is left). Expert parallelism does not add ranks: the EP group is carved out of
dp_shard x cp (as TorchTitan does), so `ep` must be a multiple of `cp` and `ep / cp` must divide `dp_shard`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NoReturn, Optional, Union

from latentforge.model.config import LAYER_KINDS, ModelConfig
from latentforge.model.errors import UserError

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
CHECKPOINT_KINDS = tuple(LAYER_KINDS.values()) + ("mtp",)


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot run this model on this world; the message names the dimension and the fix."""


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (always with sequence parallel)
    pp: int = 1  # pipeline stages (ranks)
    cp: int = 1  # context parallel (sequence split across ranks)
    cp_load_balance: bool = True  # zigzag: rank r holds chunks r and 2cp-1-r of 2cp (equal causal-attention work)
    attention_block: int = 1024  # query/key block of the parallel attention (scores alive: heads x block^2)
    ep: int = 1  # expert parallel, carved out of dp_shard x cp
    dp_shard: int = -1  # FSDP2 shards; -1: the rest of the world
    dp_replicate: int = 1  # HSDP replicas (dp_replicate > 1 with dp_shard > 1), or plain replication
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"  # "1f1b", "interleaved_1f1b", "gpipe"
    pp_virtual_stages: int = 1  # model chunks per pipeline rank (interleaved_1f1b needs >= 2)
    pp_microbatches: Optional[int] = None  # informational minimum: micro-batches per step must be >= pp
    # "none", "all", or a list of layer kinds among mamba, attention, moe, mlp, mtp
    activation_checkpoint: Union[str, list] = "none"
    compile: bool = False  # torch.compile each block (GPU runs; slow to compile on CPU)
    fsdp_reshard_after_forward: bool = True

    @classmethod
    def from_dict(cls, values: Union[Mapping[str, Any], "ParallelConfig", None]) -> "ParallelConfig":
        """From a plain dict or an OmegaConf node (the recipe's `parallel:` group; None: the defaults); unknown keys
        are named."""
        from latentforge.model.schema import from_dict

        return from_dict(cls, values, "parallel", LayoutError)

    def checkpointed_kinds(self) -> set[str]:
        spec = self.activation_checkpoint
        if spec in (None, "none", False, [], ()):
            return set()
        if spec in ("all", True):
            return set(CHECKPOINT_KINDS)
        if isinstance(spec, str):
            spec = [s.strip() for s in spec.split(",") if s.strip()]
        return set(spec)


@dataclass
class Layout:
    """The resolved sizes of every mesh dimension for one world size."""

    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    virtual_stages: int = 1
    stage_layers: list[list[int]] = field(default_factory=list)  # layer indices per pipeline stage (pp * virtual)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_in_ep(self) -> int:
        return self.ep // self.cp if self.ep > 1 else 1

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.dp_shard_in_ep

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def describe(self) -> str:
        parts = [
            f"world {self.world_size}",
            f"pp {self.pp}" + (f"x{self.virtual_stages} virtual" if self.virtual_stages > 1 else ""),
            f"dp_replicate {self.dp_replicate}",
            f"dp_shard {self.dp_shard}",
            f"cp {self.cp}",
            f"tp {self.tp}",
            f"ep {self.ep}",
        ]
        return ", ".join(parts)


def _fail(message: str) -> NoReturn:
    raise LayoutError(message)


def resolve_sizes(pc: ParallelConfig, world_size: int) -> Layout:
    for name in ("tp", "pp", "cp", "ep", "dp_replicate", "pp_virtual_stages", "attention_block"):
        value = getattr(pc, name)
        if not isinstance(value, int) or value < 1:
            _fail(f"parallel.{name} must be a positive integer, got {value!r}")
    if not isinstance(pc.dp_shard, int) or (pc.dp_shard < 1 and pc.dp_shard != -1):
        _fail(f"parallel.dp_shard must be a positive integer or -1 (fill the world), got {pc.dp_shard!r}")
    others = pc.pp * pc.dp_replicate * pc.cp * pc.tp
    if pc.dp_shard == -1:
        if world_size % others:
            _fail(
                f"world size {world_size} is not divisible by pp ({pc.pp}) x dp_replicate ({pc.dp_replicate}) "
                f"x cp ({pc.cp}) x tp ({pc.tp}) = {others}; launch a multiple of {others} processes or change "
                "the parallel sizes"
            )
        dp_shard = world_size // others
    else:
        dp_shard = pc.dp_shard
        if others * dp_shard != world_size:
            _fail(
                f"world size {world_size} != pp ({pc.pp}) x dp_replicate ({pc.dp_replicate}) x dp_shard "
                f"({dp_shard}) x cp ({pc.cp}) x tp ({pc.tp}) = {others * dp_shard}; set parallel.dp_shard=-1 "
                f"to fill the world, or launch {others * dp_shard} processes"
            )
    return Layout(
        world_size=world_size,
        pp=pc.pp,
        dp_replicate=pc.dp_replicate,
        dp_shard=dp_shard,
        cp=pc.cp,
        tp=pc.tp,
        ep=pc.ep,
        virtual_stages=pc.pp_virtual_stages,
    )


def validate_layout(
    model_cfg: ModelConfig,
    pc: ParallelConfig,
    world_size: int,
    seq_len: Optional[int] = None,
    num_microbatches: Optional[int] = None,
) -> Layout:
    """Check that `pc` runs `model_cfg` on `world_size` ranks; returns the resolved Layout (with pipeline stages).

    `seq_len` and `num_microbatches` are checked when given (the runner checks them again at every step)."""
    layout = resolve_sizes(pc, world_size)
    kinds = set(model_cfg.layer_types)
    has_attention = "attention" in kinds or model_cfg.mtp_depths > 0
    has_moe = "moe" in kinds or model_cfg.mtp_depths > 0

    # ----- tensor parallel -----------------------------------------------------------------------------------
    tp = pc.tp
    if tp > 1:
        if not pc.sequence_parallel:
            _fail(
                "parallel.sequence_parallel=false with tp > 1 is not supported: LatentForge's tensor parallelism "
                "always shards the sequence between blocks; set parallel.sequence_parallel=true"
            )

        def need_tp(value: int, name: str, why: str) -> None:
            if value % tp:
                _fail(f"parallel.tp ({tp}) must divide model.{name} ({value}) {why}; use a tp that divides {value}")

        if has_attention:
            need_tp(model_cfg.num_key_value_heads, "num_key_value_heads", "(attention is split by kv-head groups)")
            need_tp(model_cfg.num_attention_heads, "num_attention_heads", "(attention is split by heads)")
        if "mamba" in kinds:
            need_tp(model_cfg.mamba_num_heads, "mamba_num_heads", "(the Mamba mixer is split by heads)")
            need_tp(model_cfg.mamba_groups, "mamba_groups", "(B/C are split by group)")
        if "mlp" in kinds:
            need_tp(model_cfg.mlp_intermediate_size, "mlp_intermediate_size", "(dense MLP column/row split)")
        if has_moe:
            need_tp(
                model_cfg.shared_expert_intermediate_size,
                "shared_expert_intermediate_size",
                "(shared expert column/row split)",
            )

    # ----- expert parallel -----------------------------------------------------------------------------------
    ep = pc.ep
    if ep > 1:
        if not has_moe:
            _fail(f"parallel.ep ({ep}) > 1 but the model has no MoE layer; set parallel.ep=1")
        if model_cfg.num_experts % ep:
            _fail(
                f"parallel.ep ({ep}) must divide model.num_experts ({model_cfg.num_experts}): each EP rank holds "
                "an equal share of the experts"
            )
        if ep % pc.cp:
            _fail(
                f"parallel.ep ({ep}) must be a multiple of parallel.cp ({pc.cp}): the EP group is carved out of "
                "dp_shard x cp and spans whole CP groups"
            )
        if layout.dp_shard % (ep // pc.cp):
            _fail(
                f"parallel.ep / cp ({ep} / {pc.cp} = {ep // pc.cp}) must divide dp_shard ({layout.dp_shard}): "
                f"the EP group is carved out of dp_shard x cp = {layout.dp_shard * pc.cp}; use an ep that "
                f"divides {layout.dp_shard * pc.cp} and is a multiple of cp"
            )

    # ----- pipeline parallel ---------------------------------------------------------------------------------
    if pc.pp_schedule not in SCHEDULES:
        _fail(f"parallel.pp_schedule must be one of {list(SCHEDULES)}, got {pc.pp_schedule!r}")
    v = pc.pp_virtual_stages
    if pc.pp_schedule == "interleaved_1f1b" and pc.pp > 1 and v < 2:
        _fail(
            "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2 (model chunks per "
            "rank); set it, or use pp_schedule=1f1b"
        )
    if pc.pp_schedule in ("1f1b", "gpipe") and v != 1:
        _fail(
            f"parallel.pp_virtual_stages={v} needs pp_schedule=interleaved_1f1b; {pc.pp_schedule} runs one "
            "stage per rank"
        )
    if pc.pp == 1 and v != 1:
        _fail(f"parallel.pp_virtual_stages={v} needs parallel.pp > 1")
    stages = pc.pp * v
    if model_cfg.num_layers < stages:
        _fail(
            f"the model has {model_cfg.num_layers} layers, fewer than pp ({pc.pp}) x pp_virtual_stages ({v}) "
            f"= {stages} pipeline stages; every stage needs at least one layer"
        )
    if model_cfg.pipeline_cuts and pc.pp > 1 and len(model_cfg.pipeline_cuts) + 1 != stages:
        _fail(
            f"model.pattern has {len(model_cfg.pipeline_cuts)} '|' cut(s) = {len(model_cfg.pipeline_cuts) + 1} "
            f"stages, but pp ({pc.pp}) x pp_virtual_stages ({v}) = {stages}; add or remove '|' cuts, or remove "
            "them all to let the cost model balance the stages"
        )
    if pc.pp_microbatches is not None and pc.pp > 1 and pc.pp_microbatches < pc.pp:
        _fail(f"parallel.pp_microbatches ({pc.pp_microbatches}) must be >= pp ({pc.pp}) to fill the pipeline")
    if num_microbatches is not None and pc.pp > 1:
        check_microbatches(num_microbatches, pc)

    # ----- context parallel ----------------------------------------------------------------------------------
    if seq_len is not None:
        check_sequence(model_cfg, pc, seq_len)

    # ----- misc ----------------------------------------------------------------------------------------------
    unknown = pc.checkpointed_kinds() - set(CHECKPOINT_KINDS)
    if unknown:
        _fail(
            f"parallel.activation_checkpoint has unknown kind(s) {sorted(unknown)}; use 'none', 'all' or a list "
            f"among {list(CHECKPOINT_KINDS)}"
        )

    from .pipeline import split_stages

    layout.stage_layers = split_stages(model_cfg, stages)
    return layout


def check_microbatches(n: int, pc: ParallelConfig) -> None:
    if pc.pp > 1 and n < pc.pp:
        _fail(
            f"{n} micro-batch(es) per step on this data-parallel rank, fewer than pp ({pc.pp}): the pipeline "
            "schedule needs at least one per stage; raise global_batch_size or lower micro_batch_size"
        )
    if pc.pp > 1 and pc.pp_schedule == "interleaved_1f1b" and n % pc.pp:
        _fail(f"interleaved_1f1b needs the micro-batches per step ({n}) to be a multiple of pp ({pc.pp})")


def check_sequence(model_cfg: ModelConfig, pc: ParallelConfig, seq_len: int) -> None:
    split = pc.cp * pc.tp
    if seq_len % split:
        _fail(
            f"sequence length {seq_len} must be divisible by cp ({pc.cp}) x tp ({pc.tp}) = {split}: context "
            "parallel and sequence parallel split every sequence evenly; change the sequence length"
        )
    if pc.cp > 1 and "mamba" in model_cfg.layer_types:
        local = seq_len // pc.cp
        if local % model_cfg.chunk_size:
            _fail(
                f"with cp ({pc.cp}) each rank holds {local} tokens of a {seq_len}-token sequence, not a multiple "
                f"of model.chunk_size ({model_cfg.chunk_size}): use a sequence length divisible by cp x "
                f"chunk_size = {pc.cp * model_cfg.chunk_size}"
            )
        if local < model_cfg.conv_kernel - 1:
            _fail(
                f"with cp ({pc.cp}) each rank holds {local} tokens, fewer than conv_kernel - 1 "
                f"({model_cfg.conv_kernel - 1}); use fewer CP ranks or longer sequences"
            )
