"""Sandbox cost: what bubblewrap adds per untrusted program and per sandboxed reward-function call.

    python bench/bench_sandbox.py [--runs 30]

1. `run_untrusted_code("print(6 * 7)")` wall time per program, backend "bwrap" against "rlimits" (the old
   sandbox: rlimits only), interleaved so that load changes hit both alike; a bare `python -I -S -c` start is the
   floor.
2. `IsolatedFunction.call` latency of a warm child (the reward-function path: one pipe round trip per call), and
   its start time, for both backends.

Ratios are against the rlimits baseline measured in the same run; medians over --runs.
"""

import argparse
import statistics
import subprocess
import sys
import time
import warnings

from latentforge.rl.rewards import IsolatedFunction, confinement, run_untrusted_code

PLUGIN = "latentforge.rl.rewards.base:answer_section"  # a cheap (record, completion) function


def _median_s(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_programs(runs):
    bare = _median_s(
        lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "print(6 * 7)"], check=True, capture_output=True),
        runs,
    )
    times = {"rlimits": [], "bwrap": []}
    for _ in range(runs):
        for backend in times:
            start = time.perf_counter()
            result = run_untrusted_code("print(6 * 7)", backend=backend)
            times[backend].append(time.perf_counter() - start)
            assert result.ok and result.stdout.strip() == "42", result
    base = statistics.median(times["rlimits"])
    print(f"program, bare python -I -S start:  {bare * 1e3:7.1f} ms")
    for backend, values in times.items():
        median = statistics.median(values)
        print(f"program, {backend:8s} sandbox:        {median * 1e3:7.1f} ms  ({median / base:.2f}x rlimits)")


def bench_function_calls(runs):
    results = {}
    for backend in ("rlimits", "bwrap"):
        start = time.perf_counter()
        fn = IsolatedFunction(PLUGIN, backend=backend).start()
        started = time.perf_counter() - start
        call = _median_s(lambda: fn.call({"enable_thinking": False}, "completion"), runs * 10)
        fn.close()
        results[backend] = (started, call)
    base_start, base_call = results["rlimits"]
    for backend, (started, call) in results.items():
        print(
            f"reward function, {backend:8s}: start {started * 1e3:7.1f} ms ({started / base_start:.2f}x), "
            f"warm call {call * 1e6:7.1f} us ({call / base_call:.2f}x rlimits)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    problem = confinement.bwrap_problem()
    if problem is not None:
        sys.exit(f"bubblewrap is not usable here ({problem}): nothing to compare")
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"sandbox identity under bwrap: {confinement.sandbox_identity()}")
    bench_programs(args.runs)
    bench_function_calls(args.runs)


if __name__ == "__main__":
    main()
