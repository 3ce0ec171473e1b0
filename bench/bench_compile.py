"""`parallel.compile=true` on CPU: inductor against eager on the same train step, and what compiling costs.

Each configuration runs in a fresh process (dynamo state and inductor's in-memory caches start empty) on the same
model, batch and seed: eager; compiled with an empty inductor cache (cold: the full compile); compiled again on the
cache the cold run left (warm: what a restarted or resumed run pays). Per configuration: the first step (compile
included) and the median of the next steps, wall and process-CPU time (on a shared machine the CPU-time ratios are
the steadier ones). The losses of every step are compared with eager's. Nothing here asserts on time.

    python bench/bench_compile.py                       # the tiny recipe, 4 x 256 tokens, 10 timed steps
    python bench/bench_compile.py --model deep --steps 6 --threads 2

The inductor cache of `parallel.compile=true` runs is `$LATENTFORGE_CACHE` (default ~/.cache/latentforge)/inductor
(train/parallel/wrapping.py), so a run pays the compile once per model shape and torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MODELS = {"tiny": [], "deep": ["model.pattern=MEM*E-MEM*E-MEM*E-MEM*E-"]}


def one_run(args) -> dict:
    """In this process: build, (compile,) train args.steps + 1 steps; times and losses as JSON."""
    from latentforge.model import HybridModel
    from latentforge.model.recipes import compose, model_config_from
    from latentforge.train.parallel import ParallelConfig, build_runner

    torch.set_num_threads(args.threads)
    cfg = model_config_from(compose(["recipe=tiny", *MODELS[args.model]]))
    torch.manual_seed(0)
    model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig(compile=args.mode != "eager"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    walls, cpus, losses = [], [], []
    for _ in range(args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
        batch = {
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "seq_idx": torch.zeros(args.batch, args.seq_len, dtype=torch.int32),
        }
        wall, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        result = runner.forward_backward([batch])
        optimizer.step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        losses.append(result["loss"])
    return {
        "mode": args.mode,
        "first_wall": walls[0],
        "first_cpu": cpus[0],
        "step_wall": statistics.median(walls[1:]),
        "step_cpu": statistics.median(cpus[1:]),
        "losses": losses,
        "layers": cfg.num_layers,
    }


def spawn(args, mode: str, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(args.threads))
    command = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["eager", "cold", "warm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(one_run(args)))
        return 0
    with tempfile.TemporaryDirectory() as cache:  # a cache of this run only: the cold run really compiles
        runs = {mode: spawn(args, mode, cache) for mode in ("eager", "cold", "warm")}
    eager = runs["eager"]
    print(
        f"# {args.model} model ({eager['layers']} layers), {args.batch}x{args.seq_len} tokens, {args.threads} "
        f"thread(s), torch {torch.__version__}, {args.steps} timed steps after the first (median)"
    )
    print(
        f"{'run':6s} {'first step s (wall/cpu)':>24s} {'step ms (wall/cpu)':>20s} {'x eager (wall/cpu)':>19s} "
        f"{'max |loss - eager|':>18s}"
    )
    for mode, r in runs.items():
        gap = max(abs(a - b) for a, b in zip(r["losses"], eager["losses"]))
        print(
            f"{mode:6s} {r['first_wall']:>11.2f} / {r['first_cpu']:<10.2f} {1e3 * r['step_wall']:>9.1f} / "
            f"{1e3 * r['step_cpu']:<8.1f} {eager['step_wall'] / r['step_wall']:>8.2f} / "
            f"{eager['step_cpu'] / r['step_cpu']:<8.2f} {gap:>18.2e}"
        )
    cold, warm = runs["cold"], runs["warm"]
    print(
        f"compile time (first step - steady step, wall): cold {cold['first_wall'] - cold['step_wall']:.1f} s, "
        f"warm cache {warm['first_wall'] - warm['step_wall']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
