"""What an in-flight weight update costs: the behaviour-vs-trainer log-prob gap of the tokens a rollout generates
after new weights arrive mid-sequence, with `continue` (the caches of the context - attention KV, Mamba conv and SSM
states - stay as the old weights computed them; what Nemotron 3 Super's RL runs use) against `recompute` (the
context is re-run under the new weights), per token position after the update.

    python bench/bench_weight_update.py --init-from /path/to/hf [--lr 1e-4 1e-3] [--sequences 32]

The new weights are one AdamW step from the old: AdamW's first step moves every parameter by lr x sign(gradient)
(m / sqrt(v) = g / |g|), here the gradient of a GRPO-style loss (random +-1 advantages) on the old weights' own
samples; later AdamW steps move parameters by at most about as much. The trainer's log-prob is a full forward of
the new weights over prompt + completion (what the GRPO trainer computes). Also reported: the gap the same tokens
would have had if the whole sequence came from the old weights (one version of staleness, what the importance
weight corrects anyway), and the float32 floor (no update).
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch

POSITIONS = (0, 1, 2, 4, 8, 16, 32, 64)  # tokens after the update


def load(init_from: str):
    from latentforge.data.config import TokenizerConfig
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.rl.trainer import load_initial_model, resolve_model_config

    model = load_initial_model(init_from, resolve_model_config(init_from, None)).float().eval()
    exported = os.path.join(init_from, "tokenizer.json")  # a Hugging Face export has its own; a DCP checkpoint not
    spec = {"kind": "hf", "path": exported} if os.path.isfile(exported) else vars(TokenizerConfig())
    return model, load_tokenizer(spec)


def prompts(tokenizer, n: int, seed: int):
    from latentforge.rl.prompts import build_records, prompt_token_ids

    records = build_records([{"name": "arithmetic", "num": n}], "test", seed)
    return [prompt_token_ids(tokenizer, r) for r in records]


def sample(model, prompt_ids, max_new: int, seed: int, policy="continue", update=None):
    """Sample at temperature 1; `update` = (after how many engine steps, new state dict) applies new weights
    mid-sequence with `policy`. Returns the engine's results in prompt order."""
    from latentforge.model.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(
        copy.deepcopy(model),
        EngineConfig(max_batch=len(prompt_ids), max_seq_len=2048, weight_update_policy=policy),
        version=0,
    )
    ids = [
        engine.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed + i))
        for i, p in enumerate(prompt_ids)
    ]
    done, steps = {}, 0
    while engine.has_unfinished():
        if update is not None and steps == update[0]:
            engine.update_weights(update[1], version=1, policy=policy)
        done.update({r.request_id: r for r in engine.step()})
        steps += 1
    return [done[i] for i in ids]


@torch.no_grad()
def token_logprobs(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def one_adamw_step(model, results, lr: float, seed: int):
    """A copy of `model` moved by lr x sign(grad) of -sum(advantage x log-prob) over `results`."""
    stepped = copy.deepcopy(model).train()
    advantages = torch.randint(0, 2, (len(results),), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    loss = 0.0
    for adv, r in zip(advantages, results):
        ids = torch.tensor([list(r.prompt_ids) + list(r.token_ids)])
        logits = stepped(ids).logits[0, len(r.prompt_ids) - 1 : -1]
        loss = loss - adv * logits.log_softmax(-1).gather(-1, torch.tensor(r.token_ids)[:, None]).sum()
    loss.backward()
    with torch.no_grad():
        for p in stepped.parameters():
            if p.grad is not None:
                p -= lr * p.grad.sign()
                p.grad = None
    return stepped.eval()


def gaps(results, old, new, start=None):
    """Per sequence: (|behaviour - new|, |old - new|) for each token generated with the new weights (version 1),
    or from token `start` on."""
    out = []
    for r in results:
        first_new = start if start is not None else r.versions.index(1) if 1 in r.versions else len(r.versions)
        trainer = token_logprobs(new, r.prompt_ids, r.token_ids)[first_new:]
        stale = token_logprobs(old, r.prompt_ids, r.token_ids)[first_new:]
        behaviour = torch.tensor(r.logprobs[first_new:], dtype=torch.float64)
        out.append(((behaviour - trainer).abs(), (stale - trainer).abs()))
    return out


def by_position(per_sequence, which: int) -> dict:
    table = {}
    for k in POSITIONS:
        at_k = [g[which][k] for g in per_sequence if len(g[which]) > k]
        if at_k:
            values = torch.stack(at_k)
            table[k] = {"mean": float(values.mean()), "max": float(values.max()), "n": len(values)}
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", required=True, help="the policy: a Hugging Face directory or a DCP checkpoint")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--update-after", type=int, default=16, help="engine steps (tokens) before the update")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the tables as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load(args.init_from)
    prompt_ids = prompts(tokenizer, args.sequences, args.seed)
    rollouts = sample(model, prompt_ids, args.max_new_tokens, args.seed)
    report = {}
    for lr in args.lr:
        new = one_adamw_step(model, rollouts, lr, args.seed)
        new_state = {k: v.clone() for k, v in new.state_dict().items()}
        row = {}
        for policy in ("continue", "recompute"):
            results = sample(
                model, prompt_ids, args.max_new_tokens, args.seed + 1, policy, update=(args.update_after, new_state)
            )
            per_sequence = gaps(results, model, new)
            row[policy] = by_position(per_sequence, 0)
            if policy == "continue":
                row["one_version_stale"] = by_position(per_sequence, 1)
        # the engine's own float32 gap to a full forward, no update: the same token positions
        floor = gaps(sample(new, prompt_ids, args.max_new_tokens, args.seed + 1), new, new, args.update_after)
        row["float32_floor"] = by_position(floor, 0)
        report[lr] = row
        print(
            f"lr {lr:g}: mean |behaviour - trainer log-prob| of the k-th token after the update "
            f"(max in brackets), {args.sequences} sequences"
        )
        print("  k      " + "".join(f"{k:>20}" for k in POSITIONS))
        for name in ("continue", "recompute", "one_version_stale", "float32_floor"):
            cells = "".join(
                f"{row[name][k]['mean']:>10.2e} [{row[name][k]['max']:.1e}]" if k in row[name] else f"{'-':>20}"
                for k in POSITIONS
            )
            print(f"  {name:<18}{cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({str(k): v for k, v in report.items()}, f, indent=1)


if __name__ == "__main__":
    main()
