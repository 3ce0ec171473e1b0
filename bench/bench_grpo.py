"""Asynchronous vs synchronous GRPO on the same code, from the same checkpoint, with the same prompts and seeds.

    python bench/bench_grpo.py rl.init_from=runs/sft_tiny/hf                 # K=0 baseline, then K=1
    python bench/bench_grpo.py rl.init_from=... --async-staleness 2 rl.steps=30

Runs the synchronous baseline (rl.max_staleness=0) and then the asynchronous run (rl.max_staleness=K) in one
process on one Ray instance. Reports, for each: wall time of the training steps (evaluation excluded), the final
training reward (mean of the last `--window` steps) and the held-out reward before/after. Then the ratio: the
synchronous run's wall time to its final reward over the asynchronous run's wall time to reach that same reward
(moving average over `--window` steps). Arguments other than the flags are Hydra overrides for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time



BENCH_DEFAULTS = ["rl.steps=40", "optim.lr=5e-5", "optim.min_lr=5e-5",
                  "rl.prompts.eval_tasks=[{name:arithmetic,num:64,partial_credit:0.5}]"]


def moving_average(values, window):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def time_to_reach(history, target, window):
    """Wall time of the first step whose moving-average training reward reaches `target` (None: never)."""
    smooth = moving_average([m["reward_mean"] for m in history], window)
    for i, (m, r) in enumerate(zip(history, smooth)):
        if i >= window - 1 and r >= target - 1e-9:  # full windows only: one lucky early step does not count
            return m["wall_s"]
    return None


def _spin(seconds, out):
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    out.put(n / seconds)


def parallel_capacity(seconds: float = 3.0) -> float:
    """Aggregate throughput of two concurrent single-threaded processes over one alone (2.0 = two free cores):
    the most an asynchronous run (trainer and rollout side by side) can gain over the synchronous one here."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_spin, args=(seconds, q))
    p.start()
    alone = q.get()
    p.join()
    procs = [ctx.Process(target=_spin, args=(seconds, q)) for _ in range(2)]
    for p in procs:
        p.start()
    together = q.get() + q.get()
    for p in procs:
        p.join()
    return together / alone


def run_one(overrides, staleness, run_dir, label):
    from latentforge.rl import grpo

    history = []
    lines = []

    def capture(line):
        lines.append(line)
        print(f"[{label}] {line}", flush=True)

    summary = grpo.run(list(overrides) + [f"rl.max_staleness={staleness}", f"rl.run_dir={run_dir}",
                                          "rl.resume=false", "rl.checkpoint_interval=1000000"], print_fn=capture)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        history = [r for r in map(json.loads, f) if "reward_mean" in r]
    return summary, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--async-staleness", type=int, default=1, help="K of the asynchronous run")
    parser.add_argument("--window", type=int, default=5, help="steps in the reward moving average")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("recipe=") for o in overrides):
        overrides = ["recipe=grpo_tiny"] + overrides
    # the measured setting (bench/RESULTS.md): shorter than the recipe's demo run; any of these can be overridden
    for default in BENCH_DEFAULTS:
        if not any(o.split("=", 1)[0] == default.split("=", 1)[0] for o in overrides):
            overrides.append(default)
    os.environ.setdefault("WANDB_MODE", "disabled")
    capacity = parallel_capacity()
    print(f"this machine runs two single-threaded processes at {capacity:.2f}x the throughput of one", flush=True)
    work = tempfile.mkdtemp(prefix="bench_grpo_")
    try:
        sync_summary, sync_hist = run_one(overrides, 0, os.path.join(work, "sync"), "sync K=0")
        async_summary, async_hist = run_one(overrides, args.async_staleness, os.path.join(work, "async"),
                                            f"async K={args.async_staleness}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass

    w = args.window
    target = sum(m["reward_mean"] for m in sync_hist[-w:]) / min(w, len(sync_hist))
    t_sync = time_to_reach(sync_hist, target, w)
    t_async = time_to_reach(async_hist, target, w)
    result = {
        "steps": len(sync_hist), "async_staleness": args.async_staleness, "window": w,
        "sync_final_reward": target, "sync_wall_s": sync_summary["wall_s"], "sync_time_to_final_s": t_sync,
        "async_final_reward": sum(m["reward_mean"] for m in async_hist[-w:]) / min(w, len(async_hist)),
        "async_wall_s": async_summary["wall_s"], "async_time_to_sync_final_s": t_async,
        "speedup_to_sync_final": (t_sync / t_async) if t_async else None,
        "step_time_ratio": sync_summary["wall_s"] / async_summary["wall_s"],
        "sync_eval": [sync_summary.get("eval_before", {}).get("eval_sampled_reward"),
                      sync_summary.get("eval_after", {}).get("eval_sampled_reward")],
        "async_eval": [async_summary.get("eval_before", {}).get("eval_sampled_reward"),
                       async_summary.get("eval_after", {}).get("eval_sampled_reward")],
        "async_staleness_hist": _sum_hist(async_hist),
        "trainer_idle_frac": [sync_hist[-1]["trainer_idle_frac"], async_hist[-1]["trainer_idle_frac"]],
        "parallel_capacity": capacity,
    }
    print()
    print(f"synchronous  (K=0): {len(sync_hist)} steps in {result['sync_wall_s']:.1f}s, final training reward "
          f"{target:.3f} (mean of the last {w} steps, reached at {t_sync:.1f}s), held-out sampled reward "
          f"{_fmt(result['sync_eval'][0])} -> {_fmt(result['sync_eval'][1])}, trainer idle "
          f"{result['trainer_idle_frac'][0]:.2f}")
    print(f"asynchronous (K={args.async_staleness}): {len(async_hist)} steps in {result['async_wall_s']:.1f}s, final "
          f"training reward {result['async_final_reward']:.3f}, held-out sampled reward "
          f"{_fmt(result['async_eval'][0])} -> {_fmt(result['async_eval'][1])}, trainer idle "
          f"{result['trainer_idle_frac'][1]:.2f}, "
          f"token staleness {result['async_staleness_hist']}")
    if t_async:
        print(f"time to the synchronous final reward: sync {t_sync:.1f}s / async {t_async:.1f}s = "
              f"{result['speedup_to_sync_final']:.2f}x")
    else:
        print("the asynchronous run did not reach the synchronous run's final reward within its steps")
    print(f"wall time per run: sync / async = {result['step_time_ratio']:.2f}x (two processes side by side run at "
          f"{capacity:.2f}x here: the ceiling of what overlapping rollout and training can gain)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def _sum_hist(history):
    total = {}
    for m in history:
        for k, v in m["staleness_hist"].items():
            total[k] = total.get(k, 0) + v
    return total


if __name__ == "__main__":
    main()
