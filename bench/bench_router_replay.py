"""Rollout routing replay (R3) under mixed precision: the rollout scores tokens in fp32, the trainer recomputes them
under bf16 autocast (CPU) with the same weights. Reports, per routing mode, router agreement (share of token-layer
pairs whose top-k sets match the rollout's) and the engine-vs-trainer log-prob mismatch of the sampled tokens.

    python bench/bench_router_replay.py [--batch 4 --seq 128 --expert-std 0.5]

`--expert-std`: a fresh initialisation's experts barely move the output, so their weights are redrawn at this
std (a trained model's experts matter; 0 keeps the plain init)."""

import argparse
import time

import torch

from latentforge.model import HybridModel
from latentforge.model.moe import router_agreement
from latentforge.model.recipes import compose, model_config_from


def scored(model, ids, routes=None, bf16=False):
    """(log-probs of ids[:, 1:], the routes the forward used); `routes`: replay these."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, routes=routes)
    logp = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, out.routes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--expert-std", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = HybridModel(model_config_from(compose(["recipe=tiny"]))).eval()
    if args.expert_std > 0:
        with torch.no_grad():
            for moe in model.moe_layers()[: len(model.trunk_moe_index)]:  # the trunk's: its routing is measured
                moe.experts.up_proj.normal_(std=args.expert_std)
                moe.experts.down_proj.normal_(std=args.expert_std)
    ids = torch.randint(4, model.cfg.vocab_size, (args.batch, args.seq))
    started = time.perf_counter()
    rollout_logp, rollout_routes = scored(model, ids)
    print(
        f"tiny recipe, {args.batch}x{args.seq} tokens, {len(model.trunk_moe_index)} MoE layers, "
        f"expert std {args.expert_std}; rollout fp32, trainer bf16 CPU autocast"
    )
    print("| trainer routing | router agreement | mean abs log-prob mismatch | max |")
    print("|---|---|---|---|")
    for name, routes in (("own router", None), ("replayed (R3)", rollout_routes)):
        logp, trainer_routes = scored(model, ids, routes, bf16=True)
        gap = (logp - rollout_logp).abs()
        print(
            f"| {name} | {router_agreement(trainer_routes, rollout_routes):.4f} | {gap.mean():.2e} | {gap.max():.2e} |"
        )
    print(f"({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
