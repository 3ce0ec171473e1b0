"""Asynchronous GRPO entry point: the same command on a laptop and on a Slurm-allocated Ray cluster.

    python rl/grpo.py recipe=grpo_tiny rl.init_from=runs/sft_tiny/hf          # local Ray, CPU
    python rl/grpo.py recipe=grpo_tiny rl.max_staleness=0                      # the synchronous baseline
    python rl/grpo.py recipe=grpo_tiny rl.ray_address=auto                     # inside launch/grpo.sbatch

Arguments are Hydra overrides of recipes/config.yaml (groups model, data, optim, rl, parallel). The run directory
(rl.run_dir, default runs/<rl.run_name>) holding checkpoints resumes from the newest one.
"""

from __future__ import annotations

import os
import sys


import json

from latentforge.model.errors import entry_point


def load_configs(overrides):
    """The composed recipe -> (GRPOConfig, model config dict, OptimConfig, tokenizer spec, task seed, thinking,
    parallel dict, plain recipe dict)."""
    from omegaconf import OmegaConf

    from latentforge.data.config import DataConfig
    from latentforge.model.recipes import compose, model_config_from
    from latentforge.rl.config import GRPOConfig, GRPOConfigError
    from latentforge.rl.trainer import resolve_model_config
    from latentforge.train.config import OptimConfig

    cfg = compose(list(overrides))
    if cfg.get("rl") is None:
        raise GRPOConfigError("the recipe has no `rl` section: use recipe=grpo_tiny (or add `- /rl: tiny` to your "
                              "recipe's defaults)")
    plain = OmegaConf.to_container(cfg, resolve=True)
    rl = GRPOConfig.from_dict(plain["rl"])
    data = DataConfig.from_any(plain["data"])
    model = resolve_model_config(rl.init_from, model_config_from(cfg).to_dict())
    optim = OptimConfig.from_dict(plain["optim"])
    tokenizer = dict(vars(data.tokenizer))
    if rl.init_from and os.path.isfile(os.path.join(rl.init_from, "tokenizer.json")):
        tokenizer = {"kind": "hf", "path": os.path.abspath(os.path.join(rl.init_from, "tokenizer.json"))}
    task_seed = rl.prompts.seed if rl.prompts.seed is not None else data.seed
    return rl, model, optim, tokenizer, task_seed, data.enable_thinking, plain.get("parallel"), plain


def run(overrides, print_fn=print) -> dict:
    import ray

    from latentforge.rl.loop import GRPOLoop
    from latentforge.train.callbacks.preemption import PreemptionHandler

    rl, model, optim, tokenizer, task_seed, thinking, parallel, plain = load_configs(overrides)
    run_dir = os.path.abspath(rl.run_dir or os.path.join("runs", rl.run_name))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(plain, f, indent=1, default=str)
    preemption = PreemptionHandler()  # SIGTERM only sets a flag; the loop checkpoints and returns
    loop = GRPOLoop(rl, model, optim, tokenizer_spec=tokenizer, run_dir=run_dir, task_seed=task_seed,
                    enable_thinking=thinking, parallel_cfg=parallel, precision_cfg=plain.get("precision"),
                    print_fn=print_fn, stop_requested=lambda: preemption.received,
                    config_for_logs={k: plain.get(k) for k in ("rl", "model", "optim", "data")})
    started_ray = not ray.is_initialized()
    try:
        loop.setup()
        # after setup: ray.init replaces the SIGTERM handler with its own (sys.exit), which would skip the save
        preemption.on_train_start(loop)
        return loop.run()
    finally:
        preemption.on_train_end(loop, "")
        loop.close()
        if started_ray:
            ray.shutdown()


@entry_point("latentforge-grpo")
def main(argv=None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        print(f"unknown option(s) {bad}: arguments are Hydra overrides key=value, e.g. recipe=grpo_tiny",
              file=sys.stderr)
        return 2
    summary = run(overrides)
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        from latentforge.rl.loop import describe_eval

        print(f"held-out before: {describe_eval(before)}\nheld-out after:  {describe_eval(after)}\n"
              f"training wall time {summary['wall_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
