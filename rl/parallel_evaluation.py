"""lm-eval on a parallel layout (`latentforge-eval CKPT --parallel tp=2,...` under torchrun): every rank runs the same
tasks on a DCP checkpoint loaded sharded into the training runner (train/parallel), each rank reading its shards.

Log-likelihoods are scored through the runner under any layout (train/eval_harness.runner_scorer). Generation runs
the inference engine (model/engine), which decodes a token at a time and so cannot use the training plan's
sequence-parallel activations; instead each rank builds a plain model from the runner's weights:
  tensor parallel  this rank's heads / channels as plain tensors (the mixers read their sizes from their weights,
                   the engine sizes its caches from them), and every row-split Linear (o_proj, out_proj,
                   down_proj) all-reduces its output over the TP group: Megatron's TP without sequence parallelism.
                   Every TP rank runs the same requests with the same seeds and sees the same all-reduced logits,
                   so the generations are identical on all TP ranks.
  data parallel    FSDP shards are gathered (the generation model holds whole non-TP weights), requests are split
                   across DP ranks and the texts all-gathered back in request order.
Pipeline, context and expert parallelism cannot generate this way: they fail at start with one line (`blocker`).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from latentforge.train.eval_harness import LogLikelihoodLM

UNSUPPORTED_FOR_GENERATION = ("pp", "cp", "ep")


def generation_blocker(layout: dict) -> Optional[str]:
    """The one-line reason `layout` (the --parallel keys) cannot run generative tasks, or None when it can."""
    for name in UNSUPPORTED_FOR_GENERATION:
        size = int(layout.get(name, 1))
        if size > 1:
            return (
                f"generation under {name}={size} is not supported: use tp/dp_shard/dp_replicate only, or evaluate a "
                "Hugging Face export (latentforge-export) on one device"
            )
    return None


class ParallelLM(LogLikelihoodLM):
    """Log-likelihoods through the runner; generation on a plain per-rank model (module doc), built at the first
    generative request (all ranks reach it together: lm-eval runs the same requests on every rank)."""

    def __init__(self, scorer, tokenizer, runner, layout: dict, *, max_batch: int = 16, **kwargs):
        super().__init__(scorer, tokenizer, **kwargs)
        self.runner = runner
        self.layout = layout
        self.max_batch = int(max_batch)
        self._generation_model: Optional[nn.Module] = None

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from latentforge.rl.evaluation import generate_texts

        reason = generation_blocker(self.layout)
        if reason is not None:
            raise ValueError(reason)
        if self._generation_model is None:
            self._generation_model = generation_model(self.runner)
        args = [request.args for request in requests]
        dp_rank, dp_size = self.runner.dp_rank, self.runner.dp_size
        mine = list(range(dp_rank, len(args), dp_size))
        texts = generate_texts(self, self._generation_model, self.max_batch, [args[i] for i in mine], mine)
        gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [None]
        if dist.is_initialized():
            dist.all_gather_object(gathered, dict(zip(mine, texts)))
        else:
            gathered = [dict(zip(mine, texts))]
        by_index = {i: text for part in gathered for i, text in part.items()}  # TP ranks of a DP rank agree
        out = [by_index[i] for i in range(len(args))]
        for request, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def _tp_local(param: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
    """A runner parameter as a plain tensor: gathered over every mesh dimension but tp, this rank's tp shard kept;
    and the dimension it is split on over tp (None when whole)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param.detach(), None
    names = param.device_mesh.mesh_dim_names or ()
    placements, tp_dim = [], None
    for name, placement in zip(names, param.placements):
        if name == "tp" and isinstance(placement, Shard):
            placements.append(placement)
            tp_dim = placement.dim
        else:
            placements.append(Replicate())
    if list(placements) != list(param.placements):
        param = param.redistribute(param.device_mesh, placements)
    return param.to_local().detach(), tp_dim


def _unwrapped(name: str) -> str:
    """A parameter name without activation-checkpoint / compile wrappers."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


@torch.no_grad()
def generation_model(runner) -> nn.Module:
    """A plain HybridModel on this rank holding the runner's weights (module doc): TP shards local, the rest whole,
    and an all-reduce over the TP group after every Linear split by its input dimension."""
    from latentforge.model import HybridModel

    (part,) = runner.model_parts  # pp == 1: generation_blocker
    with torch.device("meta"):
        model = HybridModel(runner.model_cfg)
    row_split = []
    for name, param in part.named_parameters():
        local, tp_dim = _tp_local(param)
        owner_name, _, attr = _unwrapped(name).rpartition(".")
        owner = model.get_submodule(owner_name)
        # shares the runner's storage where nothing was gathered: a TP-only layout holds its weights once
        setattr(owner, attr, nn.Parameter(local, requires_grad=False))
        if tp_dim == 1 and isinstance(owner, nn.Linear):
            row_split.append(owner)
    for name, buffer in part.named_buffers():
        owner_name, _, attr = _unwrapped(name).rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(attr, buffer.detach(), persistent=attr not in owner._non_persistent_buffers_set)
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"generation model: the runner holds no weights for {meta[:4]}")
    group = runner.groups.tp_group
    for linear in row_split:
        linear.register_forward_hook(lambda module, inputs, output: _all_reduce(output, group))
    return model.eval()


def _all_reduce(output: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(output, group=group)
    return output


def parallel_lm(
    checkpoint: str,
    parallel: dict,
    tokenizer=None,
    *,
    micro_batch_size: int = 4,
    max_length: int = 2048,
    prefix_token_id: Optional[int] = None,
    max_batch: int = 16,
) -> ParallelLM:
    """An lm-eval model on a parallel layout (under torchrun; every rank runs the same tasks): the DCP checkpoint
    is loaded sharded into the training runner, each rank reading only its shards (module doc)."""
    from latentforge.model import HybridModel
    from latentforge.model.hf import LORA_CONFIG_FILE, resolve_checkpoint
    from latentforge.rl.evaluation import checkpoint_tokenizer
    from latentforge.train import distributed as world
    from latentforge.train.checkpoint import CheckpointManager
    from latentforge.train.eval_harness import runner_scorer
    from latentforge.train.lora.checkpoint import model_config_of
    from latentforge.train.parallel import ParallelConfig, build_runner
    from latentforge.train.trainer import ModelState

    path = resolve_checkpoint(checkpoint)  # a Hugging Face export has no shards to read in parallel
    if (path / LORA_CONFIG_FILE).is_file():
        raise ValueError(
            f"{path} is a LoRA checkpoint: merge it first (latentforge-export {path} OUT), then evaluate the export"
        )
    world.init_distributed()
    cfg = model_config_of(str(path))
    with torch.device("meta"):
        model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig.from_dict(parallel))
    missing = CheckpointManager.load(str(path), {"model": ModelState(runner.model_parts)})
    if missing:
        raise ValueError(f"{path} holds no model weights")
    for part in runner.model_parts:
        part.eval()
    scorer = runner_scorer(runner, micro_batch_size, max(1, runner.layout.pp), max_length, runner.device)
    return ParallelLM(
        scorer,
        tokenizer or checkpoint_tokenizer(str(path)),
        runner,
        dict(parallel),
        max_batch=max_batch,
        max_length=max_length,
        device=runner.device,
        prefix_token_id=prefix_token_id,
    )
