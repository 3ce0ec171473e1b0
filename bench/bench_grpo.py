"""Asynchronous vs synchronous GRPO on the same code, from the same checkpoint, with the same prompts and seeds.

    python bench/bench_grpo.py rl.init_from=runs/sft_tiny/hf                 # K=0 baseline, then K=1
    python bench/bench_grpo.py rl.init_from=... --async-staleness 2 rl.steps=30

Runs the synchronous baseline (rl.max_staleness=0) and then the asynchronous run (rl.max_staleness=K) in one
process on one Ray instance. `--arms` adds variants of the asynchronous run, side by side in the same process
(reward curves, engine-vs-trainer mismatch, router agreement, clipped share, wall time):

    python bench/bench_grpo.py rl.init_from=... --arms async ppo2 r3 recompute

`ppo2`: rl.updates_per_batch=2 (AReaL's decoupled PPO; K doubled, since versions count optimizer steps); `r3`:
rl.router_replay=true (rollout routing replay); `recompute`: rl.rollout.engine.weight_update_policy=recompute
(running sequences re-encoded under new weights instead of continuing on the old caches). Reports, for each: wall time of the training steps (evaluation excluded), the final
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


BENCH_DEFAULTS = [
    "rl.steps=40",
    "optim.lr=5e-5",
    "optim.min_lr=5e-5",
    "rl.prompts.eval_tasks=[{name:arithmetic,num:64,partial_credit:0.5}]",
]


def moving_average(values, window):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
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


def arm_overrides(arm: str, staleness: int) -> list:
    """The overrides of one arm; every arm but `sync` is the asynchronous run with staleness bound K."""
    arms = {
        "sync": ["rl.max_staleness=0"],
        "async": [f"rl.max_staleness={staleness}"],
        "ppo2": [f"rl.max_staleness={2 * staleness}", "rl.updates_per_batch=2"],
        "r3": [f"rl.max_staleness={staleness}", "rl.router_replay=true"],
        "recompute": [f"rl.max_staleness={staleness}", "rl.rollout.engine.weight_update_policy=recompute"],
    }
    if arm not in arms:
        raise SystemExit(f"--arms: unknown arm {arm!r}; choose from {sorted(arms)}")
    return arms[arm]


def run_arm(overrides, arm, staleness, run_dir):
    from latentforge.rl import grpo

    def capture(line):
        print(f"[{arm}] {line}", flush=True)

    summary = grpo.run(
        list(overrides)
        + arm_overrides(arm, staleness)
        + [f"rl.run_dir={run_dir}", "rl.resume=false", "rl.checkpoint_interval=1000000"],
        print_fn=capture,
    )
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        history = [r for r in map(json.loads, f) if "reward_mean" in r]
    return summary, history


def _mean_of(history, key):
    values = [m[key] for m in history if m.get(key) is not None]
    return sum(values) / len(values) if values else None


def compare_arms(results: dict, window: int, every: int) -> dict:
    """Side by side: per arm its summary numbers, and the reward curves (moving average over `window` steps,
    printed every `every` steps; the step axis counts optimizer steps)."""
    first = next(iter(results.values()))[1]
    target = sum(m["reward_mean"] for m in first[-window:]) / min(window, len(first))
    table = {}
    for arm, (summary, history) in results.items():
        table[arm] = {
            "wall_s": summary["wall_s"],
            "steps": summary["steps"],
            "final_reward": sum(m["reward_mean"] for m in history[-window:]) / min(window, len(history)),
            "time_to_first_arm_final_s": time_to_reach(history, target, window),
            "mismatch_mean": _mean_of(history, "mismatch_mean"),
            "mismatch_fresh_max": max(
                (m["mismatch_fresh_max"] for m in history if m.get("mismatch_fresh_max") is not None), default=None
            ),
            "router_agreement": _mean_of(history, "router_agreement"),
            "ppo_clip_frac": _mean_of(history, "ppo_clip_frac"),
            "tis_truncated_frac": _mean_of(history, "tis_truncated_frac"),
            "eval_sampled": [
                summary.get("eval_before", {}).get("eval_sampled_reward"),
                summary.get("eval_after", {}).get("eval_sampled_reward"),
            ],
            "curve": {
                m["step"]: r for m, r in zip(history, moving_average([m["reward_mean"] for m in history], window))
            },
        }
    print()
    print(
        f"{'arm':<10} {'wall':>8} {'final reward':>13} {'to ' + format(target, '.3f'):>9} {'mismatch':>9} "
        f"{'agree':>6} {'clip':>8} {'held-out sampled':>17}"
    )
    for arm, row in table.items():
        reach = row["time_to_first_arm_final_s"]
        print(
            f"{arm:<10} {row['wall_s']:>7.1f}s {row['final_reward']:>13.3f} "
            f"{(format(reach, '.1f') + 's') if reach else 'never':>9} {_fmt(row['mismatch_mean'], '.2e'):>9} "
            f"{_fmt(row['router_agreement']):>6} {_fmt(row['ppo_clip_frac'], '.1e'):>8} "
            f"{_fmt(row['eval_sampled'][0])} -> {_fmt(row['eval_sampled'][1])}"
        )
    steps = sorted(set().union(*(row["curve"] for row in table.values())))
    print(f"\ntraining reward, moving average over {window} steps:")
    print("step  " + "".join(f"{arm:>10}" for arm in table))
    for step in [s for s in steps if s % every == 0]:
        print(f"{step:<6}" + "".join(f"{_fmt(row['curve'].get(step)):>10}" for row in table.values()))
    return table


def run_one(overrides, staleness, run_dir, label):
    from latentforge.rl import grpo

    history = []
    lines = []

    def capture(line):
        lines.append(line)
        print(f"[{label}] {line}", flush=True)

    summary = grpo.run(
        list(overrides)
        + [
            f"rl.max_staleness={staleness}",
            f"rl.run_dir={run_dir}",
            "rl.resume=false",
            "rl.checkpoint_interval=1000000",
        ],
        print_fn=capture,
    )
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        history = [r for r in map(json.loads, f) if "reward_mean" in r]
    return summary, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--async-staleness", type=int, default=1, help="K of the asynchronous run")
    parser.add_argument("--window", type=int, default=5, help="steps in the reward moving average")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="instead of sync vs async: these arms side by side (sync async ppo2 r3 recompute)",
    )
    parser.add_argument("--curve-every", type=int, default=5, help="steps between printed reward-curve points")
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("recipe=") for o in overrides):
        overrides = ["recipe=grpo_tiny"] + overrides
    # the measured setting (bench/RESULTS.md): shorter than the recipe's demo run; any of these can be overridden
    for default in BENCH_DEFAULTS:
        if not any(o.split("=", 1)[0] == default.split("=", 1)[0] for o in overrides):
            overrides.append(default)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.arms:
        return main_arms(args, overrides)
    capacity = parallel_capacity()
    print(f"this machine runs two single-threaded processes at {capacity:.2f}x the throughput of one", flush=True)
    work = tempfile.mkdtemp(prefix="bench_grpo_")
    try:
        sync_summary, sync_hist = run_one(overrides, 0, os.path.join(work, "sync"), "sync K=0")
        async_summary, async_hist = run_one(
            overrides, args.async_staleness, os.path.join(work, "async"), f"async K={args.async_staleness}"
        )
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
        "steps": len(sync_hist),
        "async_staleness": args.async_staleness,
        "window": w,
        "sync_final_reward": target,
        "sync_wall_s": sync_summary["wall_s"],
        "sync_time_to_final_s": t_sync,
        "async_final_reward": sum(m["reward_mean"] for m in async_hist[-w:]) / min(w, len(async_hist)),
        "async_wall_s": async_summary["wall_s"],
        "async_time_to_sync_final_s": t_async,
        "speedup_to_sync_final": (t_sync / t_async) if t_async else None,
        "step_time_ratio": sync_summary["wall_s"] / async_summary["wall_s"],
        "sync_eval": [
            sync_summary.get("eval_before", {}).get("eval_sampled_reward"),
            sync_summary.get("eval_after", {}).get("eval_sampled_reward"),
        ],
        "async_eval": [
            async_summary.get("eval_before", {}).get("eval_sampled_reward"),
            async_summary.get("eval_after", {}).get("eval_sampled_reward"),
        ],
        "async_staleness_hist": _sum_hist(async_hist),
        "trainer_idle_frac": [sync_hist[-1]["trainer_idle_frac"], async_hist[-1]["trainer_idle_frac"]],
        "parallel_capacity": capacity,
    }
    print()
    print(
        f"synchronous  (K=0): {len(sync_hist)} steps in {result['sync_wall_s']:.1f}s, final training reward "
        f"{target:.3f} (mean of the last {w} steps, reached at {t_sync:.1f}s), held-out sampled reward "
        f"{_fmt(result['sync_eval'][0])} -> {_fmt(result['sync_eval'][1])}, trainer idle "
        f"{result['trainer_idle_frac'][0]:.2f}"
    )
    print(
        f"asynchronous (K={args.async_staleness}): {len(async_hist)} steps in {result['async_wall_s']:.1f}s, final "
        f"training reward {result['async_final_reward']:.3f}, held-out sampled reward "
        f"{_fmt(result['async_eval'][0])} -> {_fmt(result['async_eval'][1])}, trainer idle "
        f"{result['trainer_idle_frac'][1]:.2f}, "
        f"token staleness {result['async_staleness_hist']}"
    )
    if t_async:
        print(
            f"time to the synchronous final reward: sync {t_sync:.1f}s / async {t_async:.1f}s = "
            f"{result['speedup_to_sync_final']:.2f}x"
        )
    else:
        print("the asynchronous run did not reach the synchronous run's final reward within its steps")
    print(
        f"wall time per run: sync / async = {result['step_time_ratio']:.2f}x (two processes side by side run at "
        f"{capacity:.2f}x here: the ceiling of what overlapping rollout and training can gain)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main_arms(args, overrides) -> dict:
    work = tempfile.mkdtemp(prefix="bench_grpo_")
    results = {}
    try:
        for arm in args.arms:
            results[arm] = run_arm(overrides, arm, args.async_staleness, os.path.join(work, arm))
            table = compare_arms(results, args.window, args.curve_every)  # so far: a long run can be cut short
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(
                        {"arms": table, "overrides": overrides, "async_staleness": args.async_staleness}, f, indent=1
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        import ray

        ray.shutdown()
    return table


def _fmt(value, spec=".3f"):
    return "n/a" if value is None else format(value, spec)


def _sum_hist(history):
    total = {}
    for m in history:
        for k, v in m["staleness_hist"].items():
            total[k] = total.get(k, 0) + v
    return total


if __name__ == "__main__":
    main()
