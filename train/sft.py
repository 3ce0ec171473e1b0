"""Supervised fine-tuning (full or LoRA) entry point: the pretraining trainer, parallel layout and checkpoints on chat
data (ChatML with the reasoning switch, assistant-only loss, packed with document boundaries).

    python train/sft.py recipe=sft_tiny                             # from the tiny pretraining run (runs/tiny)
    torchrun --nproc-per-node 2 train/sft.py recipe=sft_tiny data.path=my_chats.jsonl
    python train/sft.py recipe=lora_tiny                            # LoRA adapters, saved in PEFT layout
    python train/sft.py --accuracy runs/sft_tiny [--adapter DIR] [--problems 200]   # held-out share solved

Starting weights (`sft.init_from`): a DCP checkpoint or run directory (train/pretrain.py, train/sft.py) or a
Hugging Face directory (ours, or a `NemotronHForCausalLM` checkpoint). The model architecture and the tokenizer come
from there (the recipe's `model` group is not used). Every `sft.eval_interval` steps the validation loss of the
held-out split is measured; the best model goes to <run_dir>/best (a DCP checkpoint; with LoRA also best/adapter),
the last one is the trainer's newest checkpoint (with LoRA also <run_dir>/adapter, a PEFT directory).
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING, List, Optional

import torch

from latentforge.model.errors import UserError, entry_point
from latentforge.train.callbacks.base import Callback
from latentforge.train.pretrain import PretrainSetup

if TYPE_CHECKING:
    from latentforge.train.lora import LoRAConfig

USAGE = (
    "python train/sft.py key=value ...   |   python train/sft.py --accuracy CHECKPOINT [--adapter DIR] [--problems N]"
)


class SFTConfigError(UserError, ValueError):
    """An SFT setting, or a starting checkpoint, that cannot work; the message names the problem and the fix."""


@dataclass
class SFTConfig:
    """The Hydra group `sft` (recipes/sft/*.yaml)."""

    init_from: Optional[str] = None  # starting weights: DCP checkpoint / run directory, or Hugging Face directory
    eval_interval: int = 50  # validation loss every this many steps and at the end; 0: never
    eval_batches: int = 4  # validation micro-batches per data-parallel rank
    save_best: bool = True  # keep the lowest-validation-loss model in <run_dir>/best
    accuracy_problems: int = 0  # built-in chat data: greedy-solve this many held-out problems before and after
    max_new_tokens: int = 96  # generation budget per problem for the accuracy check

    def __post_init__(self):
        for name in ("eval_interval", "eval_batches", "accuracy_problems"):
            if getattr(self, name) < 0:
                raise SFTConfigError(f"sft.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise SFTConfigError(f"sft.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.eval_interval and not self.eval_batches:
            raise SFTConfigError("sft.eval_interval > 0 needs sft.eval_batches >= 1 (or set eval_interval=0)")

    @classmethod
    def from_dict(cls, values: dict) -> "SFTConfig":
        from latentforge.model.schema import from_dict

        return from_dict(cls, values, "sft", SFTConfigError)


# ----- configuration -------------------------------------------------------------------------------------------
def rewrite_overrides(overrides: List[str]) -> List[str]:
    """`data.path=file.jsonl` (one file, as in the README) is `data.paths=[file.jsonl]`."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == "data.path":
            value = value.strip()
            out.append(f"data.paths=[{value}]" if not value.startswith("[") else f"data.paths={value}")
        else:
            out.append(o)
    return out


@dataclass
class SFTSetup(PretrainSetup):
    """A composed fine-tuning recipe: pretraining's groups plus `sft` and `lora` (None: full fine-tuning)."""

    sft: SFTConfig
    lora: Optional[LoRAConfig]


def load_configs(overrides) -> SFTSetup:
    """The composed recipe, validated against each group's dataclass."""
    from latentforge.model.schema import plain
    from latentforge.train.lora import LoRAConfig
    from latentforge.train.pretrain import load_configs as load_pretrain_configs

    base = load_pretrain_configs(rewrite_overrides(overrides))
    sft_node, lora_node = base.recipe.get("sft"), base.recipe.get("lora")
    setup = SFTSetup(
        **{f.name: getattr(base, f.name) for f in fields(base)},
        # plain() keeps what is no mapping as it is: from_dict's error names the group
        sft=SFTConfig.from_dict(plain(sft_node) if sft_node is not None else {}),
        lora=LoRAConfig.from_dict(plain(lora_node)) if lora_node is not None else None,
    )
    if setup.train.seq_len_schedule:
        raise SFTConfigError(
            "train.seq_len_schedule is for pretraining: fine-tuning packs conversations into rows of train.seq_len; "
            "remove it (train.seq_len_schedule=[])"
        )
    if setup.data.kind != "sft":
        raise SFTConfigError(
            f"data.kind is {setup.data.kind!r}: fine-tuning reads chat data. Use a recipe with "
            "`override /data: synthetic_chat` (sft_tiny, lora_tiny) or set data.kind=sft"
        )
    return setup


# ----- the starting checkpoint ---------------------------------------------------------------------------------
def starting_point(sft_cfg: SFTConfig):
    """(kind, path, ModelConfig) of `sft.init_from`."""
    from latentforge.train.lora.checkpoint import model_config_of, resolve_source

    if not sft_cfg.init_from:
        raise SFTConfigError(
            "sft.init_from is not set: give the starting weights (a run directory of "
            "train/pretrain.py such as runs/tiny, a DCP checkpoint, or a Hugging Face directory)"
        )
    if not os.path.exists(sft_cfg.init_from):
        raise SFTConfigError(
            f"sft.init_from={sft_cfg.init_from} does not exist. Pretrain first "
            "(python train/pretrain.py recipe=tiny writes runs/tiny) or point it at a checkpoint"
        )
    kind, path = resolve_source(sft_cfg.init_from)
    return kind, path, model_config_of(path)


def _recorded_tokenizer(kind: str, path: str) -> Optional[dict]:
    """The tokenizer fingerprint the starting DCP checkpoint's trainer state recorded (None if none)."""
    if kind != "dcp":
        return None
    from latentforge.train.checkpoint import CheckpointManager, checkpoint_keys, pack, unpack

    if "trainer" not in checkpoint_keys(path):
        return None
    from latentforge.train.trainer import TrainState

    box = {"trainer": pack(asdict(TrainState()))}
    CheckpointManager.load(path, box)
    return unpack(box["trainer"]).get("tokenizer")


def starting_tokenizer(kind: str, path: str, data_cfg, model_cfg):
    """The starting checkpoint's tokenizer (and so its chat template's token ids). A tokenizer named in the data
    config must be the same one: fine-tuning with another tokenizer would scramble every token."""
    from latentforge.data.config import TokenizerConfig
    from latentforge.data.tokenizer import HFTokenizer, TokenizerMismatchError, load_tokenizer

    file = os.path.join(path, "tokenizer.json")
    recorded = _recorded_tokenizer(kind, path)
    requested = data_cfg.tokenizer if data_cfg.tokenizer != TokenizerConfig() else None
    if os.path.isfile(file):
        tokenizer = HFTokenizer(file)
        if recorded is not None:
            tokenizer.check_matches(recorded, f"the starting checkpoint {path}")
        if requested is not None:
            theirs = load_tokenizer(requested, cache_dir=data_cfg.cache_dir)
            if theirs.fingerprint()["sha256"] != tokenizer.fingerprint()["sha256"]:
                raise TokenizerMismatchError(
                    f"latentforge.data.tokenizer ({requested.kind}, vocab {theirs.vocab_size}) is not the tokenizer of the "
                    f"starting checkpoint {path} ({file}, vocab {tokenizer.vocab_size}). The tokenizer and chat "
                    "template come from the checkpoint: drop the data.tokenizer override, or start from a "
                    "checkpoint trained with that tokenizer"
                )
    else:
        # no tokenizer file (e.g. a tekken run): the data config names it, the checkpoint's record must agree
        tokenizer = load_tokenizer(data_cfg.tokenizer, cache_dir=data_cfg.cache_dir)
        if recorded is not None:
            tokenizer.check_matches(recorded, f"the starting checkpoint {path}")
        elif kind == "hf":
            raise TokenizerMismatchError(
                f"the Hugging Face directory {path} has no tokenizer.json, so its tokenizer is unknown: copy the "
                "model's tokenizer.json there"
            )
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the starting model only {model_cfg.vocab_size} "
            "embedding rows: this tokenizer does not belong to that checkpoint"
        )
    return tokenizer


def build_model(model_cfg, precision_cfg, kind: str, path: str, device):
    """The starting model: weights loaded, then the precision policy (which keeps the weights it swaps around)."""
    from latentforge.model import HybridModel
    from latentforge.train.lora.checkpoint import load_base_weights
    from latentforge.train.precision import apply_precision

    with torch.device(device):
        model = HybridModel(model_cfg)
    load_base_weights(model, path)
    apply_precision(model, precision_cfg)
    return model


# ----- validation and the best checkpoint ----------------------------------------------------------------------
def validation_batches(data_cfg, tokenizer, train_cfg, sft_cfg, dp_rank, dp_size) -> list:
    """The first `sft.eval_batches` micro-batches of the held-out split for this data-parallel rank (fixed)."""
    from latentforge.data.sft import build_sft_loader

    loader = build_sft_loader(
        data_cfg,
        tokenizer,
        seq_len=train_cfg.seq_len,
        micro_batch_size=train_cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        split="valid",
    )
    per_pass = max(1, loader.samples_per_epoch // (train_cfg.micro_batch_size * dp_size))
    return [next(loader) for _ in range(min(sft_cfg.eval_batches, per_pass))]


def validation_loss(runner, batches: list, device) -> float:
    """Mean next-token loss over the batches' assistant tokens (the LM loss: no MTP or balance terms), in eval
    mode (no dropout), forward only (`runner.evaluate`)."""
    parts = runner.model_parts
    modes = [p.training for p in parts]
    for p in parts:
        p.eval()
    try:
        result = runner.evaluate([{k: v.to(device) for k, v in b.items()} for b in batches])
    finally:
        for p, mode in zip(parts, modes):
            p.train(mode)
    return float(result["lm_loss"])


class Validation(Callback):
    """Validation loss every `interval` steps and at the last one; saves the best model when it improves."""

    order = 20  # after the speed monitor, before the writers: they log `val_loss`
    essential = True  # a collective forward on every rank

    def __init__(self, batches: list, interval: int, device, on_best=None):
        self.batches = batches
        self.interval = interval
        self.device = device
        self.on_best = on_best
        self.best = math.inf
        self.best_step = None
        self.history = []  # (step, loss) of this launch

    def measure(self, trainer) -> float:
        return validation_loss(trainer.runner, self.batches, self.device)

    def on_step_end(self, trainer, metrics: dict) -> None:
        step = metrics["step"]
        if not self.interval or (step % self.interval and step != trainer.last_step):
            return
        loss = self.measure(trainer)
        metrics["val_loss"] = loss
        self.history.append((step, loss))
        improved = loss < self.best
        if improved:
            self.best, self.best_step = loss, step
            if self.on_best is not None:
                self.on_best(trainer, step, loss)
        if trainer.is_metrics_rank:
            trainer.print(
                f"validation step {step}: loss {loss:.4f}{' (best)' if improved else ''}; best "
                f"{self.best:.4f} at step {self.best_step}"
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", math.inf)
        self.best_step = state.get("best_step")


def best_saver(run_dir: str, write_extra, lora_cfg, base_path: str):
    """Saves the model parts to <run_dir>/best (DCP, newest only) and, with LoRA, best/adapter (PEFT)."""
    from latentforge.train.checkpoint import CheckpointManager
    from latentforge.train.lora import gather_lora_state_dict, write_adapter
    from latentforge.train.trainer import ModelState

    folder = os.path.join(run_dir, "best")
    manager = CheckpointManager(folder, keep_last=1)

    def save(trainer, step: int, loss: float) -> None:
        def extra(directory: str) -> None:
            write_extra(directory)
            with open(os.path.join(directory, "validation.json"), "w") as f:
                json.dump({"step": step, "val_loss": loss}, f)

        manager.save(step, {"model": ModelState(trainer.runner.model_parts)}, write_extra=extra)
        if lora_cfg is not None:
            tensors = gather_lora_state_dict(trainer.runner.model_parts)
            if tensors is not None:
                write_adapter(tensors, os.path.join(folder, "adapter"), lora_cfg, base_path)

    return save


# ----- held-out accuracy (built-in chat data) ------------------------------------------------------------------
def greedy_completions(model, prompts: List[List[int]], max_new_tokens: int, stop_ids: set) -> List[List[int]]:
    """Greedy continuation of each prompt (the stop token kept), decoded together by the generation engine."""
    from latentforge.model.engine import Engine, EngineConfig, SamplingParams

    config = EngineConfig(
        max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + max_new_tokens, prefix_cache_size=0
    )
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
    return [result.token_ids for result in Engine(model, config).generate(prompts, params)]


def heldout_accuracy(model, tokenizer, data_cfg, num_problems: int, max_new_tokens: int, batch_size: int = 32):
    """(solved, attempted, examples) on the first `num_problems` problems of the built-in chat test split.

    Each example: question, answer, completion, correct, formatted (an 'Answer: N' line was produced at all)."""
    from latentforge.data.chat import render_chat
    from latentforge.data.synthetic import check_answer, extract_answer, problem_messages, synthetic_splits

    problems = synthetic_splits(data_cfg.synthetic_num_train, data_cfg.synthetic_num_heldout, data_cfg.seed)["test"][
        :num_problems
    ]
    model = model.eval()
    stop = {tokenizer.im_end_id, tokenizer.eod_id}
    solved, examples = 0, []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [
            render_chat(
                tokenizer,
                problem_messages(p, with_solution=False),
                enable_thinking=data_cfg.enable_thinking,
                add_generation_prompt=True,
            ).ids
            for p in chunk
        ]
        for problem, completion in zip(chunk, greedy_completions(model, prompts, max_new_tokens, stop)):
            # the prompt ends in <think> when thinking is on: put it back so the answer parser skips the reasoning
            text = ("<think>" if data_cfg.enable_thinking else "") + tokenizer.decode(completion)
            ok = check_answer(problem, text)
            solved += ok
            examples.append(
                {
                    "question": problem["question"],
                    "answer": problem["answer"],
                    "completion": text,
                    "correct": ok,
                    "formatted": extract_answer(text) is not None,
                }
            )
    return solved, len(problems), examples


def describe_accuracy(solved: int, total: int, examples: list) -> str:
    formatted = sum(e["formatted"] for e in examples)
    lines = [
        f"{solved}/{total} solved ({100 * solved / max(total, 1):.1f}%), {formatted}/{total} with an 'Answer: N' line"
    ]
    lines += [f"  [{'ok' if e['correct'] else 'wrong'}] {e['question']!r} -> {e['completion']!r}" for e in examples[:3]]
    return "\n".join(lines)


def uses_builtin_chat(data_cfg) -> bool:
    from latentforge.data.config import BUILTIN_CHAT

    return BUILTIN_CHAT in data_cfg.paths


# ----- the job -------------------------------------------------------------------------------------------------
@entry_point("latentforge-sft")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(usage=USAGE, description="LatentForge fine-tuning (Hydra overrides as arguments)")
    parser.add_argument(
        "--accuracy",
        metavar="CHECKPOINT",
        default=None,
        help="only measure the held-out share of built-in chat problems solved by CHECKPOINT "
        "(a run directory, DCP checkpoint or Hugging Face directory)",
    )
    parser.add_argument("--adapter", default=None, help="with --accuracy: a PEFT adapter directory to apply")
    parser.add_argument("--problems", type=int, default=100, help="with --accuracy: how many held-out problems")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; everything else must be a Hydra override key=value")
    if args.accuracy:
        return accuracy_main(args, overrides)
    return run(overrides)


def accuracy_main(args, overrides) -> int:
    from latentforge.train.lora.checkpoint import load_model, resolve_source

    if not any(o.startswith("recipe=") for o in overrides):
        overrides = ["recipe=sft_tiny", *overrides]  # the built-in chat set's settings
    setup = load_configs(overrides)
    data_cfg, sft_cfg = setup.data, setup.sft
    kind, path = resolve_source(args.accuracy)
    model, _ = load_model(path, args.adapter)
    tokenizer = starting_tokenizer(kind, path, data_cfg, model.cfg)
    solved, total, examples = heldout_accuracy(model, tokenizer, data_cfg, args.problems, sft_cfg.max_new_tokens)
    print(
        f"held-out accuracy of {path}{' + ' + args.adapter if args.adapter else ''}: "
        + describe_accuracy(solved, total, examples)
    )
    return 0


def run(overrides) -> int:
    from omegaconf import OmegaConf

    from latentforge.data.sft import SFTSource, build_sft_loader
    from latentforge.model.params import training_flops_per_token
    from latentforge.model.recipes import plain_values
    from latentforge.train import distributed as world
    from latentforge.train.callbacks import standard_callbacks
    from latentforge.train.checkpoint import CheckpointManager
    from latentforge.train.lora import apply_lora, lora_parameters, save_adapter
    from latentforge.train.lora.checkpoint import LORA_CONFIG_FILE
    from latentforge.train.parallel import build_runner
    from latentforge.train.pretrain import checkpoint_extra_writer, print_start, run_dir_of
    from latentforge.train.run_dir import claim_run_dir
    from latentforge.train.trainer import Trainer

    setup = load_configs(overrides)
    train_cfg, sft_cfg, lora_cfg, data_cfg = setup.train, setup.sft, setup.lora, setup.data
    kind, start_path, model_cfg = starting_point(sft_cfg)
    if lora_cfg is not None:
        # the base stays frozen, its MoE routing bias included (an adapter is only valid on the base it was
        # trained against): no aux-loss-free balancing updates
        model_cfg = replace(model_cfg, expert_bias_update_rate=0.0)
        if lora_cfg.init_seed is None:  # the same adapter initialisation on every rank, whatever ran before
            lora_cfg = replace(lora_cfg, init_seed=train_cfg.seed)
            setup.lora = lora_cfg
    setup.model = model_cfg  # the checkpoint's architecture, whatever the recipe's model group says

    world.init_distributed()
    claim = None
    try:
        device = world.training_device()
        is_rank0 = world.rank() == 0
        run_dir = run_dir_of(train_cfg)
        claim = claim_run_dir(run_dir, train_cfg)  # before anything is written into it
        tokenizer = starting_tokenizer(kind, start_path, data_cfg, model_cfg)

        torch.manual_seed(train_cfg.seed)
        model = build_model(model_cfg, setup.precision, kind, start_path, device)
        accuracy_before = None
        if sft_cfg.accuracy_problems and uses_builtin_chat(data_cfg) and is_rank0:
            solved, total, examples = heldout_accuracy(
                model, tokenizer, data_cfg, sft_cfg.accuracy_problems, sft_cfg.max_new_tokens
            )
            accuracy_before = [solved, total, sum(e["formatted"] for e in examples)]
            print("held-out accuracy before fine-tuning: " + describe_accuracy(solved, total, examples), flush=True)
            model.train()
        world.barrier()
        if lora_cfg is not None:
            adapted = apply_lora(model, lora_cfg)
            if is_rank0:
                count = sum(p.numel() for p in lora_parameters(model).values())
                print(
                    f"LoRA: rank {lora_cfg.rank}, alpha {lora_cfg.alpha}{' (rsLoRA)' if lora_cfg.use_rslora else ''}"
                    f" on {len(adapted)} modules, {count:,} trainable parameters",
                    flush=True,
                )

        runner = build_runner(model, model_cfg, setup.parallel, setup.precision)
        if lora_cfg is not None:
            failure = None
            try:
                check_only_adapters_train(runner.model_parts, runner.stage_ids)
            except (SFTConfigError, RuntimeError) as error:
                failure = error
            # only the ranks owning a bad stage see it: fail everywhere, not leave the others in a collective
            if world.any_rank(failure is not None):
                raise failure or SFTConfigError(
                    "LoRA: another rank's pipeline stage failed the adapter check "
                    "(its error names the stage and the fix)"
                )
        loader = build_sft_loader(
            data_cfg,
            tokenizer,
            seq_len=train_cfg.seq_len,
            micro_batch_size=train_cfg.micro_batch_size,
            dp_rank=runner.dp_rank,
            dp_size=runner.dp_size,
            split="train",
        )

        write_extra = checkpoint_extra_writer(setup, tokenizer)
        if lora_cfg is not None:
            base_writer = write_extra

            def write_extra(directory: str) -> None:
                base_writer(directory)
                with open(os.path.join(directory, LORA_CONFIG_FILE), "w") as f:
                    json.dump(lora_cfg.to_dict(), f, indent=2)

        validation = None
        if sft_cfg.eval_interval:
            batches = validation_batches(data_cfg, tokenizer, train_cfg, sft_cfg, runner.dp_rank, runner.dp_size)
            on_best = best_saver(run_dir, write_extra, lora_cfg, start_path) if sft_cfg.save_best else None
            validation = Validation(batches, sft_cfg.eval_interval, device, on_best)
        callbacks = standard_callbacks(
            train_cfg,
            partial(training_flops_per_token, model_cfg),  # per step's seq_len
            run_dir,
            device,
            world.world_size(),
            plain_values(setup.recipe),
            extra=[validation] if validation is not None else [],
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
            write_checkpoint_extra=write_extra,
        )
        resumed = trainer.resume_if_possible()
        if is_rank0:  # the launch is accepted (the checkpoint matches this model and tokenizer)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(setup.recipe, resolve=True))
        world.barrier()
        if validation is not None and not resumed:
            validation.on_step_end(trainer, {"step": 0})  # the starting model's validation loss (step 0)

        if runner.is_metrics_rank:
            source = loader.source
            assert isinstance(source, SFTSource), "build_sft_loader packs an SFTSource"
            print(
                f"start      {start_path} ({kind}); {source.stats['conversations']} training "
                f"conversations, {loader.samples_per_epoch} packed rows per epoch",
                flush=True,
            )
            print_start(setup, trainer, run_dir, resumed, world.world_size(), device)
        reason = trainer.fit()
        if runner.is_metrics_rank:
            print(
                f"stopped at step {trainer.state.step}/{train_cfg.steps} ({reason}); checkpoint "
                f"{trainer.last_checkpoint}",
                flush=True,
            )

        if lora_cfg is not None and trainer.last_checkpoint:
            out = save_adapter(runner.model_parts, os.path.join(run_dir, "adapter"), lora_cfg, start_path)
            if out is not None:
                print(f"adapter (PEFT layout): {out}", flush=True)
        if reason == "finished" and trainer.last_checkpoint and is_rank0:
            finish(trainer.last_checkpoint, run_dir, train_cfg, sft_cfg, data_cfg, tokenizer, lora_cfg, accuracy_before)
        world.barrier()
    finally:
        if claim is not None:
            claim.release()
        world.shutdown_distributed()
    return 0


def check_only_adapters_train(parts, stage_ids=None) -> None:
    """After parallelisation only adapter parameters may be trainable (a layer that rebuilt a frozen parameter as a
    trainable one would silently train, and give optimizer state to, the base), and every pipeline stage this rank
    owns needs some adapter (its optimizer would have nothing to update)."""
    wrong = [
        name for part in parts for name, param in part.named_parameters() if param.requires_grad != (".lora_" in name)
    ]
    if wrong:
        raise RuntimeError(
            f"LoRA: after build_runner {len(wrong)} parameter(s) have the wrong requires_grad (base "
            f"trainable or adapter frozen), e.g. {wrong[:4]}: a parallel layer lost the flag"
        )
    for index, part in enumerate(parts):
        if not any(p.requires_grad for p in part.parameters()):
            stage = stage_ids[index] if stage_ids is not None else index
            layers = list(part.backbone.layers.keys()) if hasattr(part.backbone.layers, "keys") else []
            raise SFTConfigError(
                f"LoRA: pipeline stage {stage} (layers {layers}{', MTP' if part.mtp is not None else ''}) holds no "
                "adapted module, so it has nothing to train. Add targets that occur in those layers to "
                "lora.targets (e.g. up_proj/down_proj for dense MLP layers, lora.include_mtp=true for the MTP "
                "block) or change parallel.pp"
            )


def finish(checkpoint, run_dir, train_cfg, sft_cfg, data_cfg, tokenizer, lora_cfg, accuracy_before) -> None:
    """Rank 0 after training: the Hugging Face export (adapters merged) and the held-out accuracy."""
    from latentforge.train.lora.checkpoint import export_merged, load_model

    if train_cfg.export_hf:
        out = os.path.join(run_dir, "hf")
        if lora_cfg is not None:
            export_merged(checkpoint, out)
        else:
            from latentforge.train.export import export_checkpoint

            export_checkpoint(checkpoint, out)
        print(f"Hugging Face export{' (adapters merged)' if lora_cfg is not None else ''}: {out}", flush=True)
    if sft_cfg.accuracy_problems and uses_builtin_chat(data_cfg):
        model, _ = load_model(checkpoint)
        solved, total, examples = heldout_accuracy(
            model, tokenizer, data_cfg, sft_cfg.accuracy_problems, sft_cfg.max_new_tokens
        )
        print("held-out accuracy after fine-tuning: " + describe_accuracy(solved, total, examples), flush=True)
        if accuracy_before:
            print(
                f"held-out accuracy: {accuracy_before[0]}/{accuracy_before[1]} before, {solved}/{total} after "
                "fine-tuning",
                flush=True,
            )
        with open(os.path.join(run_dir, "accuracy.json"), "w") as f:
            json.dump(
                {
                    "before": accuracy_before,
                    "after": [solved, total, sum(e["formatted"] for e in examples)],
                    "checkpoint": checkpoint,
                    "examples": examples,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
