"""Pipeline parallelism: cutting the layer pattern into stages (runner.py runs them with a
torch.distributed.pipelining schedule: 1F1B, interleaved 1F1B or GPipe).

Stages are contiguous runs of layers. With `|` cuts in the pattern (Megatron style) the cuts are used as given;
otherwise a cost model balances them: each layer costs its active parameters per token (a token's FLOPs are
about twice that), the embedding lookup costs nothing, and the last stage also pays the lm_head and the MTP block
at each depth. The balance minimises the most expensive stage. Stage s runs on pipeline rank s % pp.
"""

from __future__ import annotations


def layer_costs(model_cfg) -> tuple[list, float]:
    """(cost of each trunk layer, extra cost of the last stage: lm_head (+ MTP depths)), in active params/token."""
    counts = _counts(model_cfg)
    per_kind = {kind: active for kind, (_, _, active) in counts.per_layer.items()}
    costs = [float(per_kind[kind]) for kind in model_cfg.layer_types]
    depths = model_cfg.mtp_depths
    # each MTP depth runs the whole `*E` block (at its active size) and the lm_head once more
    mtp_active = 0
    if depths:
        cfg = model_cfg
        inactive = (cfg.num_experts - cfg.top_k) * 2 * cfg.moe_intermediate_size * cfg.expert_dim
        mtp_active = counts.mtp - inactive
    return costs, float(counts.lm_head * (1 + depths) + depths * mtp_active)


_COUNTS: dict = {}


def _counts(model_cfg):
    """Parameter counts of the model built on the meta device (cached per config)."""
    from latentforge.model.params import count_parameters, meta_model

    key = repr(sorted(model_cfg.to_dict().items()))
    if key not in _COUNTS:
        _COUNTS[key] = count_parameters(meta_model(model_cfg))
    return _COUNTS[key]


def balance(costs: list, num_stages: int, tail: float = 0.0) -> list:
    """Contiguous split of `costs` into `num_stages` non-empty parts minimising the largest part (the last part
    also carries `tail`). Returns the start index of every part."""
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"cannot cut {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max cost splitting the first i layers into s stages; where[s][i]: start of the last one
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    where = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            extra = tail if (s == num_stages and i == n) else 0.0
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], where[s][i] = cost, j
    starts, i = [], n
    for s in range(num_stages, 0, -1):
        j = where[s][i]
        starts.append(j)
        i = j
    return starts[::-1]


def split_stages(model_cfg, num_stages: int) -> list:
    """Layer indices of each pipeline stage: the pattern's `|` cuts when present, else the cost model."""
    n = model_cfg.num_layers
    if num_stages == 1:
        return [list(range(n))]
    if model_cfg.pipeline_cuts:
        starts = [0] + list(model_cfg.pipeline_cuts)
        if len(starts) != num_stages:
            raise ValueError(f"model.pattern has {len(starts)} stages ('|' cuts) for {num_stages} pipeline stages")
    else:
        costs, tail = layer_costs(model_cfg)
        starts = balance(costs, num_stages, tail)
    bounds = starts + [n]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_stages)]


def stage_ranks(num_stages: int, pp: int) -> list:
    """Pipeline rank of each stage: stage s runs on rank s % pp (the looped layout of interleaved 1F1B)."""
    return [s % pp for s in range(num_stages)]
