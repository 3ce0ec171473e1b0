"""From scored groups to training tensors: advantages, loss masks, behaviour log-probabilities, micro-batches.

A sample of prompt p (P tokens) and completion c (C tokens) becomes one row: `input_ids = (p + c)[:-1]`,
`targets = (p + c)[1:]`; the loss covers the C positions whose target is a completion token (of a multi-turn
episode: only the tokens the model generated, per `Sample.completion_mask`, never the environment's observations). Rows are padded on
the right inside a micro-batch (causal model: padding never reaches a real position) with loss mask 0; under a
pipeline-parallel layout every micro-batch of a step is padded to one shape (rows and length), as the schedule
needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from latentforge.rl.buffer import Group
from latentforge.rl.losses import group_advantages

PAD_ID = 0
IGNORE_INDEX = -100


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
            generated = sample.completion_mask if sample.completion_mask is not None else [True] * c
            rows.append(
                {
                    "input_ids": tokens[:-1],
                    "targets": tokens[1:],
                    "loss_mask": [0.0] * (p - 1) + [keep if g else 0.0 for g in generated],
                    "behaviour_logprobs": [0.0] * (p - 1) + list(sample.logprobs),
                    "versions": [-1] * (p - 1) + list(sample.versions),
                    "advantage": a,
                    "group_id": g.group_id,
                    "sample_index": sample.sample_index,
                }
            )
            if sample.routes is not None:
                rows[-1]["routes"] = torch.as_tensor(sample.routes)[: len(tokens) - 1]
    return rows


def count(rows: List[dict], max_tokens: int) -> BatchCounts:
    tokens = sum(sum(r["loss_mask"]) for r in rows)
    sequences = sum(1 for r in rows if sum(r["loss_mask"]) > 0)
    positions = sum(len(r["targets"]) for r in rows)
    return BatchCounts(float(tokens), float(sequences), max_tokens, float(positions))


def collate(rows: List[dict], device=None, length: Optional[int] = None, num_rows: Optional[int] = None) -> dict:
    """Pad a list of rows into (b, s) tensors: to `length` positions and `num_rows` rows when given (the parallel
    layouts need equal or divisible shapes); padding has loss mask 0.

    Everything the loss needs about a *whole* row is computed here and broadcast over its positions, so the loss
    stays a sum over tokens when the runner cuts rows into pieces (context / sequence parallelism):
    `row_tokens` (its loss tokens, for sequence-level aggregation) and `row_version` (the single version its
    stamped tokens share, -2 when they differ, -1 when none is stamped: the staleness-0 mismatch statistic).
    `labels` are the targets at real positions (-100 elsewhere): the runner shifts them for the MTP heads."""
    longest = max(len(r["input_ids"]) for r in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"collate: length {length} is shorter than the longest row ({longest} tokens)")
    if num_rows is not None:
        if num_rows < len(rows):
            raise ValueError(f"collate: num_rows {num_rows} is fewer than the {len(rows)} rows given")
        rows = list(rows) + [PLACEHOLDER] * (num_rows - len(rows))

    def pad(key, value, dtype):
        return torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows], dtype=dtype, device=device)

    def per_row(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)[:, None].expand(-1, length).contiguous()

    valid = pad("input_ids", -1, torch.long) >= 0  # real (non-padding) positions
    routes = _pad_routes(rows, length, device) if any("routes" in r for r in rows) else None
    real = valid & per_row([not r.get("placeholder", False) for r in rows], torch.bool)  # ... of real rows
    targets = pad("targets", PAD_ID, torch.long)
    return {
        "input_ids": pad("input_ids", PAD_ID, torch.long),
        "targets": targets,
        "labels": torch.where(real, targets, torch.full_like(targets, IGNORE_INDEX)),
        "loss_mask": pad("loss_mask", 0.0, torch.float32),
        "behaviour_logprobs": pad("behaviour_logprobs", 0.0, torch.float32),
        "versions": pad("versions", -1, torch.long),
        "advantages": per_row([r["advantage"] for r in rows], torch.float32),
        "row_tokens": per_row([max(sum(r["loss_mask"]), 1.0) for r in rows], torch.float32),
        "row_version": per_row([_row_version(r["versions"]) for r in rows], torch.long),
        "valid": valid,
        # what the runner's MoE balance loss and expert loads count: real tokens of real rows (not placeholders)
        "attention_mask": real,
        **({"routes": routes} if routes is not None else {}),
    }


def _pad_routes(rows: List[dict], length: int, device) -> torch.Tensor:
    """(b, length, MoE layers, top_k) replayed expert ids; padding and placeholder rows get experts 0..top_k-1
    (distinct ids, no loss, left out of the balance loss by the attention mask)."""
    sample = next(r["routes"] for r in rows if "routes" in r)
    layers, top_k = sample.shape[1], sample.shape[2]
    out = torch.arange(top_k, dtype=torch.long).expand(len(rows), length, layers, top_k).clone()
    for i, row in enumerate(rows):
        if "routes" in row:
            out[i, : row["routes"].shape[0]] = row["routes"]
        elif not row.get("placeholder", False) and row["input_ids"]:  # e.g. an episode whose reset failed
            raise ValueError(
                f"row {row['group_id']}/{row['sample_index']} has no recorded routes while others "
                "do: rollout routing replay needs every sample's routes"
            )
    return out.to(device)


def _row_version(versions: list) -> int:
    stamped = {v for v in versions if v >= 0}
    if not stamped:
        return -1
    return stamped.pop() if len(stamped) == 1 else -2


def padded_length(rows: List[dict], multiple: int = 1) -> int:
    """The longest row, rounded up to `multiple` (the layout's sequence divisor)."""
    longest = max(len(r["input_ids"]) for r in rows) if rows else 1
    return -(-longest // multiple) * multiple


PLACEHOLDER = {
    "input_ids": [PAD_ID],
    "targets": [PAD_ID],
    "loss_mask": [0.0],
    "behaviour_logprobs": [0.0],
    "versions": [-1],
    "advantage": 0.0,
    "group_id": -1,
    "sample_index": -1,
    "placeholder": True,
}


def shard_micro_batches(
    rows: List[dict],
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    min_micro_batches: int = 1,
    multiple_of: int = 1,
) -> List[List[dict]]:
    """This data-parallel rank's micro-batches. Every rank gets the same number (collectives inside FSDP must
    match; a rank short of rows gets placeholder rows with an all-zero loss mask), at least `min_micro_batches`
    and a multiple of `multiple_of` (pipeline schedules), and no micro-batch holds more than
    `micro_batch_size` rows."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad data-parallel coordinates rank {dp_rank} of {dp_size}")
    if micro_batch_size < 1 or min_micro_batches < 1 or multiple_of < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}), min_micro_batches ({min_micro_batches}) and "
            f"multiple_of ({multiple_of}) must be >= 1"
        )
    per_rank = -(-len(rows) // dp_size)
    num_micro = max(min_micro_batches, -(-per_rank // micro_batch_size), 1)
    num_micro = -(-num_micro // multiple_of) * multiple_of
    size = max(1, -(-per_rank // num_micro))  # spread the rows evenly: equal micro-batches pad little
    mine = rows[dp_rank::dp_size]
    # sort by length so a micro-batch pads little (the loss normalisers are global, so order does not matter)
    mine = sorted(mine, key=lambda r: len(r["input_ids"]))
    out = []
    for i in range(num_micro):
        chunk = mine[i * size : (i + 1) * size]
        out.append(chunk or [PLACEHOLDER])
    return out
