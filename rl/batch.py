"""From scored groups to training tensors: advantages, loss masks, behaviour log-probabilities, micro-batches.

A sample of prompt p (P tokens) and completion c (C tokens) becomes one row: `input_ids = (p + c)[:-1]`,
`targets = (p + c)[1:]`; the loss covers the C positions whose target is a completion token. Rows are padded on
the right inside a micro-batch (causal model: padding never reaches a real position) with loss mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from rl.buffer import Group
from rl.losses import group_advantages

PAD_ID = 0


@dataclass
class BatchCounts:
    """Global normalisers of the loss (the whole batch, every rank): see rl.losses.aggregate."""

    num_tokens: float
    num_sequences: float
    max_tokens: int
    num_positions: float = 0.0  # every real (non-padding) position: the MTP loss's normaliser


def group_rows(groups: List[Group], normalize_std: bool, filter_overlong: bool) -> List[dict]:
    """One dict of python lists per sample, advantage included; truncated samples get a zero mask if asked."""
    if not groups:
        return []
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    advantages = group_advantages(rewards, normalize_std=normalize_std)
    rows = []
    for g, adv in zip(groups, advantages.tolist()):
        for sample, a in zip(g.samples, adv):
            tokens = list(sample.prompt_ids) + list(sample.completion_ids)
            p, c = len(sample.prompt_ids), len(sample.completion_ids)
            keep = 0.0 if (filter_overlong and sample.truncated) else 1.0
            rows.append({
                "input_ids": tokens[:-1], "targets": tokens[1:],
                "loss_mask": [0.0] * (p - 1) + [keep] * c,
                "behaviour_logprobs": [0.0] * (p - 1) + list(sample.logprobs),
                "versions": [-1] * (p - 1) + list(sample.versions),
                "advantage": a, "group_id": g.group_id, "sample_index": sample.sample_index,
            })
    return rows


def count(rows: List[dict], max_tokens: int) -> BatchCounts:
    tokens = sum(sum(r["loss_mask"]) for r in rows)
    sequences = sum(1 for r in rows if sum(r["loss_mask"]) > 0)
    positions = sum(len(r["targets"]) for r in rows)
    return BatchCounts(float(tokens), float(sequences), max_tokens, float(positions))


def collate(rows: List[dict], device=None) -> dict:
    """Pad a list of rows into (b, s) tensors."""
    length = max(len(r["input_ids"]) for r in rows)

    def pad(key, value, dtype):
        return torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows], dtype=dtype, device=device)

    advantages = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32, device=device)
    return {
        "input_ids": pad("input_ids", PAD_ID, torch.long),
        "targets": pad("targets", PAD_ID, torch.long),
        "loss_mask": pad("loss_mask", 0.0, torch.float32),
        "behaviour_logprobs": pad("behaviour_logprobs", 0.0, torch.float32),
        "versions": pad("versions", -1, torch.long),
        "advantages": advantages[:, None].expand(-1, length).contiguous(),
        "valid": pad("input_ids", -1, torch.long) >= 0,  # real (non-padding) positions
    }


def shard_micro_batches(rows: List[dict], dp_rank: int, dp_size: int, micro_batch_size: int) -> List[List[dict]]:
    """This data-parallel rank's micro-batches. Every rank gets the same number of micro-batches (collectives
    inside FSDP must match); a rank short of rows gets placeholder rows with an all-zero loss mask."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad data-parallel coordinates rank {dp_rank} of {dp_size}")
    per_rank = -(-len(rows) // dp_size)
    num_micro = max(1, -(-per_rank // micro_batch_size))
    mine = rows[dp_rank::dp_size]
    placeholder = {"input_ids": [PAD_ID], "targets": [PAD_ID], "loss_mask": [0.0], "behaviour_logprobs": [0.0],
                   "versions": [-1], "advantage": 0.0, "group_id": -1, "sample_index": -1}
    # sort by length so a micro-batch pads little (the loss normalisers are global, so order does not matter)
    mine = sorted(mine, key=lambda r: len(r["input_ids"]))
    out = []
    for i in range(num_micro):
        chunk = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
        out.append(chunk or [placeholder])
    return out
