"""Plain decoding under torch.inference_mode (the engine's step) against torch.no_grad (its step before), one process.

    python bench/bench_engine_grad_mode.py model=deep prompts=8 max_new_tokens=64 rounds=4 batches=1,8

The no_grad arm runs the same engine with its `torch.inference_mode` swapped for `torch.no_grad`; the arms
alternate (no_grad, inference_mode, no_grad, ...) on the same prompts and report process-CPU seconds per round
(the steadier measure on a shared machine), the best round and the ratio. Same greedy tokens: checked.
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass

import torch

import latentforge.model.engine.engine as engine_module
from bench_generate import BenchArgs, train_tiny  # noqa: E402  (bench/ is the script's directory)
from latentforge.rl.generate import parse_key_values


@dataclass
class GradModeArgs(BenchArgs):
    rounds: int = 4


def engine_torch(grad_mode: str):
    """torch as the engine module sees it, with inference_mode replaced by no_grad for the "no_grad" arm."""
    if grad_mode == "inference_mode":
        return torch
    proxy = types.ModuleType("torch_no_grad_engine")
    proxy.__dict__.update(torch.__dict__)
    proxy.inference_mode = torch.no_grad
    return proxy


def main(argv=None) -> int:
    args = parse_key_values(sys.argv[1:] if argv is None else argv, GradModeArgs)
    torch.set_num_threads(args.threads)
    from latentforge.data.config import resolve_cache_dir
    from latentforge.data.synthetic import problem_messages, synthetic_splits
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.model.engine import Engine, EngineConfig, SamplingParams
    from latentforge.rl.generate import prompt_ids

    tokenizer = load_tokenizer(args.tokenizer or "bpe:4096")
    model = train_tiny(args, tokenizer, resolve_cache_dir(None))
    problems = synthetic_splits(num_train=1, num_heldout=args.prompts, seed=args.seed)["test"][: args.prompts]
    prompts = [
        prompt_ids(tokenizer, problem_messages(p, with_solution=False)[0]["content"], True, args.think)
        for p in problems
    ]
    params = SamplingParams(
        temperature=0.0, max_new_tokens=args.max_new_tokens, stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id)
    )
    max_len = max(map(len, prompts)) + args.max_new_tokens
    for batch in [int(b) for b in args.batches.split(",")]:
        cpu = {"no_grad": [], "inference_mode": []}
        tokens = {}
        for _ in range(args.rounds):
            for mode in cpu:
                engine_module.torch = engine_torch(mode)
                engine = Engine(model, EngineConfig(max_batch=batch, max_seq_len=max_len, prefix_cache_size=0))
                start = time.process_time()
                results = engine.generate(prompts, params)
                cpu[mode].append(time.process_time() - start)
                tokens[mode] = [r.token_ids for r in results]
        engine_module.torch = torch
        rounds = " | ".join(f"{mode}: " + ", ".join(f"{s:.2f}" for s in seconds) for mode, seconds in cpu.items())
        print(
            f"batch {batch}: CPU s per round {rounds}; best inference_mode / no_grad "
            f"{min(cpu['inference_mode']) / min(cpu['no_grad']):.3f}; same tokens "
            f"{tokens['no_grad'] == tokens['inference_mode']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
