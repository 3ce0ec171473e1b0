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
from dataclasses import dataclass

from latentforge.data.config import DataConfig, TokenizerConfig
from latentforge.model.config import ModelConfig
from latentforge.model.errors import entry_point
from latentforge.rl.config import GRPOConfig
from latentforge.train.config import OptimConfig
from latentforge.train.parallel.config import ParallelConfig
from latentforge.train.precision.config import PrecisionConfig


@dataclass
class GRPOSetup:
    """A composed GRPO recipe as validated config objects; `recipe` is the plain composed recipe (run logs)."""

    rl: GRPOConfig
    model: ModelConfig  # the policy's architecture: rl.init_from's own when it has one, else the `model` group
    optim: OptimConfig
    data: DataConfig
    parallel: ParallelConfig  # the trainer group's layout
    precision: PrecisionConfig
    tokenizer: TokenizerConfig  # the data group's, or rl.init_from's tokenizer.json
    recipe: dict

    @property
    def task_seed(self) -> int:
        """The prompt tasks' seed: rl.prompts.seed, else the SFT data's (so held-out problems stay held out)."""
        return self.rl.prompts.seed if self.rl.prompts.seed is not None else self.data.seed


def load_configs(overrides) -> GRPOSetup:
    """The composed recipe, validated against each group's dataclass."""
    from latentforge.model.recipes import compose, model_config_from, plain_values
    from latentforge.rl.config import GRPOConfigError
    from latentforge.rl.trainer import resolve_model_config

    cfg = compose(list(overrides))
    if cfg.get("rl") is None:
        raise GRPOConfigError(
            "the recipe has no `rl` section: use recipe=grpo_tiny (or add `- /rl: tiny` to your recipe's defaults)"
        )
    plain = plain_values(cfg)
    rl = GRPOConfig.from_dict(plain["rl"])
    data = DataConfig.from_any(plain["data"])
    tokenizer = data.tokenizer
    if rl.init_from and os.path.isfile(os.path.join(rl.init_from, "tokenizer.json")):
        tokenizer = TokenizerConfig(kind="hf", path=os.path.abspath(os.path.join(rl.init_from, "tokenizer.json")))
    return GRPOSetup(
        rl=rl,
        model=resolve_model_config(rl.init_from, model_config_from(cfg)),
        optim=OptimConfig.from_dict(plain["optim"]),
        data=data,
        parallel=ParallelConfig.from_dict(plain.get("parallel")),
        precision=PrecisionConfig.from_dict(plain.get("precision")),
        tokenizer=tokenizer,
        recipe=plain,
    )


def run(overrides, print_fn=print) -> dict:
    import ray

    from latentforge.rl.loop import GRPOLoop
    from latentforge.train.callbacks.preemption import PreemptionHandler

    setup = load_configs(overrides)
    rl = setup.rl
    run_dir = os.path.abspath(rl.run_dir or os.path.join("runs", rl.run_name))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(setup.recipe, f, indent=1, default=str)
    preemption = PreemptionHandler()  # SIGTERM only sets a flag; the loop checkpoints and returns
    loop = GRPOLoop(
        rl,
        setup.model,
        setup.optim,
        tokenizer_spec=setup.tokenizer,
        run_dir=run_dir,
        task_seed=setup.task_seed,
        enable_thinking=setup.data.enable_thinking,
        parallel_cfg=setup.parallel,
        precision_cfg=setup.precision,
        print_fn=print_fn,
        stop_requested=lambda: preemption.received,
        config_for_logs={k: setup.recipe.get(k) for k in ("rl", "model", "optim", "data")},
    )
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
        print(
            f"unknown option(s) {bad}: arguments are Hydra overrides key=value, e.g. recipe=grpo_tiny", file=sys.stderr
        )
        return 2
    summary = run(overrides)
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        from latentforge.rl.loop import describe_eval

        print(
            f"held-out before: {describe_eval(before)}\nheld-out after:  {describe_eval(after)}\n"
            f"training wall time {summary['wall_s']:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
