"""Tensor parallelism as a plan: Mamba's rows stored rank-contiguous (no gather at forward time), checkpoints and
optimizer state in the natural (Hugging Face) order, loadable across layouts."""

import copy
import warnings

import pytest
import torch

from tests.distributed import run_distributed

from .test_parallel_common import global_batches, one_thread, tiny_config

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

MIXER = "backbone.layers.0.mixer."  # the tiny model's first layer is a Mamba mixer


def _cfg():
    return tiny_config(moe_aux_loss_coeff=0.0, expert_bias_update_rate=0.0)


def _one_process_model(seed: int):
    from latentforge.model import HybridModel

    torch.manual_seed(seed)
    return HybridModel(_cfg())


def _worker(rank, world_size, checkpoint_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from latentforge.train.config import OptimConfig
    from latentforge.train.optim import OptimizerContainer
    from latentforge.train.parallel import ParallelConfig, build_runner
    from latentforge.train.parallel.tensor_parallel import natural_gradients, rank_rows

    model = _one_process_model(seed=0)
    plain = copy.deepcopy(model)
    runner = build_runner(model, model.cfg, ParallelConfig(tp=2))
    part = runner.model_parts[0]
    mixer = part.get_submodule(MIXER.rstrip("."))
    in_rows = rank_rows(mixer.in_proj_blocks(), world_size, rank)
    conv_rows = rank_rows(mixer.conv_blocks(), world_size, rank)
    checks = {}
    # this rank's heads' rows are its Shard(0) piece: nothing to gather at forward time
    checks["in_proj"] = torch.equal(
        mixer.in_proj.weight.to_local(), plain.state_dict()[MIXER + "in_proj.weight"][in_rows]
    )
    checks["conv1d"] = torch.equal(
        mixer.conv1d.weight.to_local(), plain.state_dict()[MIXER + "conv1d.weight"][conv_rows]
    )

    # a checkpoint written by one process (natural order) loads into the TP layout
    state = get_model_state_dict(part)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(part, state)
    written = _one_process_model(seed=1).state_dict()
    checks["loaded in_proj"] = torch.equal(mixer.in_proj.weight.to_local(), written[MIXER + "in_proj.weight"][in_rows])
    checks["loaded conv bias"] = torch.equal(mixer.conv1d.bias.to_local(), written[MIXER + "conv1d.bias"][conv_rows])
    saved = {k: v.full_tensor() for k, v in get_model_state_dict(part).items() if k.startswith(MIXER)}
    checks["saved natural"] = all(torch.equal(v, written[k]) for k, v in saved.items())

    # optimizer state: AdamW's first moment after one step is (1 - beta1) * grad, in the natural order on save
    batch = {k: v[:2] for k, v in global_batches(model.cfg, steps=1)[0].items()}
    optimizer = OptimizerContainer([part], OptimConfig(lr=1e-3, weight_decay=0.0))
    runner.forward_backward([batch])
    grads = natural_gradients(part)
    optimizer.step()
    natural = optimizer.state_dict()
    beta1 = optimizer.optimizers[0].param_groups[0]["betas"][0]
    name = MIXER + "in_proj.weight"
    moment = natural[f"state.{name}.exp_avg"].full_tensor()
    checks["moment natural"] = torch.allclose(moment, (1 - beta1) * grads[name].full_tensor(), rtol=1e-6, atol=1e-9)
    stored = mixer.in_proj.weight
    before = optimizer.optimizers[0].state[stored]["exp_avg"].to_local().clone()
    for value in optimizer.optimizers[0].state[stored].values():
        if torch.is_tensor(value) and value.dim() > 0:
            value.zero_()
    optimizer.load_state_dict(natural)
    checks["moment reloaded"] = torch.equal(
        optimizer.optimizers[0].state[mixer.in_proj.weight]["exp_avg"].to_local(), before
    )
    return checks


def test_mamba_rows_rank_contiguous_and_checkpoints_natural(tmp_path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(_one_process_model(seed=1).state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    for rank, checks in enumerate(run_distributed(_worker, 2, str(tmp_path))):
        assert all(checks.values()), (rank, {k: v for k, v in checks.items() if not v})
