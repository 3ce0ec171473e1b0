"""lm-eval on the same export: LatentForge's `latentforge` model vs lm-eval's stock `hf` model (transformers), per
task, in one process: wall time, the ratio, and whether the metrics agree.

    python bench/bench_eval.py runs/tiny/hf                      # the local tasks, all documents
    python bench/bench_eval.py out/hf --tasks lf_choice,lf_text --batch-size 16 --limit 50

The stock model runs with transformers' eager experts and its CPU-only Mamba step-size clamp lifted (as the tests
do), so both compute the same function; its generation runs at batch 1 (transformers' Mamba path is not exact under
left padding), its log-likelihoods at `--batch-size`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def stock_hf(export: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, experts_implementation="eager")
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))
    return HFLM(pretrained=model.eval(), tokenizer=AutoTokenizer.from_pretrained(export), batch_size=batch_size)


def timed(lm, task: str, limit):
    from latentforge.train.eval_harness import run_tasks, task_metrics

    started = time.perf_counter()
    metrics = task_metrics(run_tasks(lm, [task], limit=limit))[task]
    return time.perf_counter() - started, metrics


def main(argv=None) -> int:
    from latentforge.rl.evaluation import LatentForgeLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a Hugging Face export written by LatentForge")
    parser.add_argument("--tasks", default="lf_arith,lf_choice,lf_text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ours = LatentForgeLM(args.export, batch_size=args.batch_size, max_batch=args.batch_size)
    theirs_ll = stock_hf(args.export, args.batch_size)
    theirs_gen = stock_hf(args.export, 1)
    print("| task | latentforge s | stock hf s | hf / latentforge | metrics agree |")
    print("|---|---|---|---|---|")
    for task in args.tasks.split(","):
        mine_s, mine = timed(ours, task, args.limit)
        generation = task == "lf_arith" or "gen" in task
        theirs_s, theirs = timed(theirs_gen if generation else theirs_ll, task, args.limit)
        agree = mine.keys() == theirs.keys() and all(math.isclose(mine[k], theirs[k], rel_tol=1e-5) for k in mine)
        print(f"| {task} | {mine_s:.2f} | {theirs_s:.2f} | {theirs_s / mine_s:.2f}x | {agree} {mine} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
