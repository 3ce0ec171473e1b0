"""The gloo multi-process helper runs functions per rank and reports failures with the rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank_and_return_a_tensor(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item(), torch.full((1000,), float(rank))


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_runs_in_n_processes_and_tensors_come_back_intact():
    # one launch for both checks: each launch spends seconds starting processes on 2 CPU cores
    out = run_distributed(_all_reduce_rank_and_return_a_tensor, 3)
    assert [total for total, _ in out] == [6.0, 6.0, 6.0]
    for rank, (_, tensor) in enumerate(out):
        assert torch.equal(tensor, torch.full((1000,), float(rank)))


def test_failures_name_the_rank():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
