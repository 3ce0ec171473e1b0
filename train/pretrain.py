"""Pretraining entry point: one code path from 2 CPU processes to thousands of GPUs.

    torchrun --nproc-per-node 2 train/pretrain.py recipe=tiny            # gloo on CPU, NCCL with CUDA
    python train/pretrain.py recipe=tiny train.steps=20                  # a single process
    python train/pretrain.py recipe=super_120b --dry-run [--world-size 64]  # print the plan, allocate nothing

Arguments are Hydra overrides of recipes/config.yaml. The run directory (train.run_dir, default
runs/<train.run_name>) is the same on every rank by construction; starting again with the same run directory
continues from its newest complete checkpoint (train.resume=false starts over in place).
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import shutil
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from latentforge.model.errors import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from latentforge.data.config import DataConfig
    from latentforge.model.config import ModelConfig
    from latentforge.train.config import OptimConfig, TrainConfig
    from latentforge.train.parallel import ParallelConfig
    from latentforge.train.precision import PrecisionConfig

USAGE = "python train/pretrain.py [--dry-run] [--world-size N] key=value ..."


def parse_args(argv):
    parser = argparse.ArgumentParser(usage=USAGE, description="LatentForge pretraining (Hydra overrides as arguments)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the mesh, pipeline stages and memory per GPU, then exit without allocating",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --dry-run: plan for this many ranks (default: the launched world, else the "
        "product of the recipe's parallel sizes)",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; everything else must be a Hydra override key=value")
    return args, overrides


@dataclass
class PretrainSetup:
    """A composed pretraining recipe as validated config objects; `recipe` is the composed recipe itself (written
    as config.yaml into the run directory and every checkpoint)."""

    model: ModelConfig
    train: TrainConfig
    optim: OptimConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    data: DataConfig
    recipe: DictConfig


def load_configs(overrides) -> PretrainSetup:
    """The composed recipe, validated against each group's dataclass."""
    from latentforge.data.config import DataConfig
    from latentforge.model.recipes import compose, model_config_from, plain_values
    from latentforge.train.config import OptimConfig, TrainConfig
    from latentforge.train.parallel import ParallelConfig
    from latentforge.train.precision import PrecisionConfig

    cfg = compose(overrides)

    def plain(node) -> dict:
        return plain_values(node) if node is not None else {}

    setup = PretrainSetup(
        model=model_config_from(cfg),
        train=TrainConfig.from_dict(plain(cfg.train)),
        optim=OptimConfig.from_dict(plain(cfg.optim)),
        parallel=ParallelConfig.from_dict(plain(cfg.get("parallel"))),
        precision=PrecisionConfig.from_dict(plain(cfg.get("precision"))),
        data=DataConfig.from_any(plain(cfg.data)),
        recipe=cfg,
    )
    if setup.train.seq_len_schedule:  # every length must run on the layout: refused now, not when its phase comes
        from latentforge.train.seq_schedule import SeqLenSchedule, check_schedule_layout

        check_schedule_layout(SeqLenSchedule.of(setup.train, cp=setup.parallel.cp), setup.model, setup.parallel)
    return setup


def planned_world_size(pc, requested) -> int:
    if requested:
        return requested
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if pc.dp_shard == -1:
        return pc.pp * pc.dp_replicate * pc.cp * pc.tp * max(1, pc.ep // pc.cp)
    return pc.pp * pc.dp_replicate * pc.dp_shard * pc.cp * pc.tp


def print_plan(setup: PretrainSetup, world_size: int) -> None:
    from latentforge.train.parallel.config import validate_layout
    from latentforge.train.plan import format_plan

    from latentforge.train.seq_schedule import SeqLenSchedule, without_cp

    layout = validate_layout(setup.model, setup.parallel, world_size, seq_len=setup.train.seq_len)
    # with train.seq_len_schedule, one plan per length: activation memory is decided by the longest micro-batch
    shapes = SeqLenSchedule.of(setup.train, layout.dp, layout.cp).shape_by_seq_len.values()
    for shape in shapes:
        # a phase with cp: false runs its CP ranks as data-parallel ones (the same parameter shards)
        phase_cfg = setup.parallel if shape.context_parallel else without_cp(setup.parallel)
        if len(shapes) > 1:
            cp_use = "" if shape.context_parallel or layout.cp == 1 else ", without CP (cp: false)"
            print(f"train.seq_len_schedule phase(s) at {shape.seq_len} tokens{cp_use}:")
        phase_layout = validate_layout(setup.model, phase_cfg, world_size, seq_len=shape.seq_len)
        print(
            format_plan(
                setup.model,
                phase_cfg,
                phase_layout,
                seq_len=shape.seq_len,
                micro_batch_size=shape.micro_batch_size,
                global_batch_size=shape.global_batch_size,
            )
        )


def run_dir_of(train_cfg) -> str:
    return os.path.abspath(train_cfg.run_dir or os.path.join("runs", train_cfg.run_name))


def tokenizer_file(tokenizer):
    """The Hugging Face tokenizer.json behind the tokenizer (copied into checkpoints and exports), else None."""
    from latentforge.data.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer) and os.path.isfile(tokenizer.path):
        return tokenizer.path
    return None


def checkpoint_extra_writer(setup: PretrainSetup, tokenizer):
    """Rank 0 writes human-readable files next to the shards: what export and people need."""
    from omegaconf import OmegaConf

    from latentforge.train.export import MODEL_CONFIG_FILE, TOKENIZER_FILE

    model_config = setup.model.to_dict()
    recipe_yaml = OmegaConf.to_yaml(setup.recipe, resolve=True)
    source = tokenizer_file(tokenizer)

    def write(directory: str) -> None:
        with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
            json.dump(model_config, f, indent=2)
        with open(os.path.join(directory, "config.yaml"), "w") as f:
            f.write(recipe_yaml)
        if source is not None:
            shutil.copyfile(source, os.path.join(directory, TOKENIZER_FILE))

    return write


def build_loader(setup: PretrainSetup, tokenizer, dp_rank: int, dp_size: int, cp_rank: int = 0, cp: int = 1):
    """The pretraining batches of one data-parallel rank: one stream, or one per length of train.seq_len_schedule
    (a length whose phases run without CP is read by the dp x cp ranks, CP rank `cp_rank` of `cp` being one)."""
    from latentforge.data.pretrain import build_mixed_length_pretrain_loader, build_pretrain_loader
    from latentforge.train.seq_schedule import SeqLenSchedule

    train_cfg = setup.train
    if not train_cfg.seq_len_schedule:
        return build_pretrain_loader(
            setup.data,
            tokenizer,
            seq_len=train_cfg.seq_len,
            micro_batch_size=train_cfg.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
    schedule = SeqLenSchedule.of(train_cfg, dp_size, cp)
    shapes = schedule.shape_by_seq_len
    return build_mixed_length_pretrain_loader(
        setup.data,
        tokenizer,
        micro_batch_sizes={length: shape.micro_batch_size for length, shape in shapes.items()},
        dp_rank=dp_rank,
        dp_size=dp_size,
        readers={
            length: (dp_rank * cp + cp_rank, dp_size * cp)
            for length, shape in shapes.items()
            if shape.cp_ranks_as_dp > 1
        },
    )


def build_model(setup: PretrainSetup, device):
    from latentforge.model import HybridModel
    from latentforge.train.precision import apply_precision

    with torch.device(device):
        model = HybridModel(setup.model)
    table = apply_precision(model, setup.precision)
    return model, table


@entry_point("latentforge-pretrain")
def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    setup = load_configs(overrides)
    train_cfg, model_cfg = setup.train, setup.model

    if args.dry_run:
        print_plan(setup, planned_world_size(setup.parallel, args.world_size))
        return 0

    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.model.params import training_flops_per_token
    from latentforge.train import distributed as world
    from latentforge.train.callbacks import standard_callbacks
    from latentforge.train.checkpoint import CheckpointManager
    from latentforge.train.parallel import build_runner
    from latentforge.train.run_dir import claim_run_dir
    from latentforge.train.trainer import Trainer

    world.init_distributed()
    claim = None
    try:
        device = world.training_device()
        is_rank0 = world.rank() == 0
        run_dir = run_dir_of(train_cfg)
        claim = claim_run_dir(run_dir, train_cfg)  # before anything is written into it
        data_cfg = setup.data
        tokenizer = load_tokenizer(data_cfg.tokenizer, cache_dir=data_cfg.cache_dir)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{model_cfg.vocab_size}: use a model with at least that many rows, or another "
                "tokenizer (data.tokenizer)"
            )

        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        model, _ = build_model(setup, device)
        runner = build_runner(model, model_cfg, setup.parallel, setup.precision)
        loader = build_loader(setup, tokenizer, runner.dp_rank, runner.dp_size, runner.groups.cp_rank, runner.layout.cp)

        from omegaconf import OmegaConf

        from latentforge.model.recipes import plain_values

        callbacks = standard_callbacks(
            train_cfg,
            partial(training_flops_per_token, model_cfg),  # per step's seq_len
            run_dir,
            device,
            world.world_size(),
            plain_values(setup.recipe),
            tokenizer=tokenizer,
        )
        trainer = Trainer(
            runner=runner,
            loader=loader,
            train_cfg=train_cfg,
            optim_cfg=setup.optim,
            checkpoints=CheckpointManager(
                os.path.join(run_dir, "checkpoints"), train_cfg.keep_last, train_cfg.async_checkpoint
            ),
            callbacks=callbacks,
            device=device,
            model_config=model_cfg.to_dict(),
            tokenizer=tokenizer,
            write_checkpoint_extra=checkpoint_extra_writer(setup, tokenizer),
        )
        resumed = trainer.resume_if_possible()
        if is_rank0:  # the launch is accepted (the checkpoint matches this model and tokenizer)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(setup.recipe, resolve=True))
        world.barrier()

        if runner.is_metrics_rank:
            print_start(setup, trainer, run_dir, resumed, world.world_size(), device)
        reason = trainer.fit()
        if runner.is_metrics_rank:
            print(
                f"stopped at step {trainer.state.step}/{train_cfg.steps} ({reason}); "
                f"{trainer.state.skipped_steps} skipped step(s); checkpoint {trainer.last_checkpoint}",
                flush=True,
            )

        if train_cfg.export_hf and reason == "finished" and trainer.last_checkpoint:
            if is_rank0:
                from latentforge.train.export import export_checkpoint

                out = export_checkpoint(trainer.last_checkpoint, os.path.join(run_dir, "hf"))
                print(f"Hugging Face export: {out}", flush=True)
            world.barrier()
    finally:
        if claim is not None:
            claim.release()
        world.shutdown_distributed()
    return 0


def print_start(setup: PretrainSetup, trainer, run_dir, resumed, world_size, device) -> None:
    """The run's header: where, on what, the layout and its memory plan, and where it starts from."""
    from latentforge.train.flops import device_label
    from latentforge.train.plan import format_plan

    train_cfg = setup.train
    runner = trainer.runner
    lines = [
        f"run        {run_dir}",
        f"devices    {world_size} x {device_label(device)}",
        format_plan(
            setup.model,
            setup.parallel,
            runner.layout,
            seq_len=train_cfg.seq_len,
            micro_batch_size=train_cfg.micro_batch_size,
            global_batch_size=train_cfg.global_batch_size,
        ),
        f"schedule   {setup.optim.schedule}, peak lr {setup.optim.lr:g}, {train_cfg.steps} steps"
        + (f", this launch stops at {train_cfg.stop_at_step}" if train_cfg.stop_at_step else ""),
        *seq_len_schedule_lines(trainer),
        "start      " + (f"resumed from {resumed} at step {trainer.state.step}" if resumed else "step 0 (new run)"),
    ]
    print("\n".join(lines), flush=True)


def seq_len_schedule_lines(trainer) -> list:
    """One line per phase of train.seq_len_schedule (none without one)."""
    schedule, dp_size = trainer.seq_schedule, trainer.runner.dp_size
    if not trainer.cfg.seq_len_schedule:
        return []
    return [
        f"seq_len    phase {index}: {phase.steps} step(s) at {shape.seq_len} tokens, {shape.global_batch_size} "
        f"sequences per step, micro-batch {shape.micro_batch_size} x {shape.grad_accumulation(dp_size)} per "
        + ("data-parallel rank" if shape.cp_ranks_as_dp == 1 else "rank (cp: false, CP ranks read as data-parallel)")
        + f" ({schedule.tokens_per_step} tokens per step, cycling every {schedule.cycle} steps)"
        for index, (phase, shape) in enumerate(zip(schedule.phases, schedule.shapes))
    ]


if __name__ == "__main__":
    sys.exit(main())
