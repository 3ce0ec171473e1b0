"""The gloo multi-process helper runs functions per rank and reports failures with the rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_runs_in_n_processes():
    assert run_distributed(_all_reduce_rank, 3) == [6.0, 6.0, 6.0]


def test_failures_name_the_rank():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def _return_tensor(rank, world_size):
    return torch.full((1000,), float(rank))


def test_tensors_come_back_intact():
    out = run_distributed(_return_tensor, 2)
    assert torch.equal(out[0], torch.zeros(1000)) and torch.equal(out[1], torch.ones(1000))
