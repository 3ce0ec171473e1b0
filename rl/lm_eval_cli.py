"""`latentforge-lm-eval`: lm-evaluation-harness's own command line, every flag and subcommand as `lm_eval` has
them, with the `latentforge` model registered:

    latentforge-lm-eval --model latentforge --model_args checkpoint=runs/sft_tiny,batch_size=8 \
        --tasks lf_arith,lf_choice --include_path data/eval_tasks --output_path out/eval

Why a command of our own: lm-eval (0.4.13, constraints.txt) finds a model only in its built-in table
(lm_eval/models/__init__.py) or among classes some imported module registered; it reads no plugin entry points. So
stock `lm_eval --model latentforge` answers "no model for this name found" unless latentforge.rl.evaluation is
imported first, which is all this command adds.
"""

from __future__ import annotations


def main() -> None:
    # the built-in table first: lm-eval loads it only into an empty registry, and ours would make it non-empty
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    import latentforge.rl.evaluation  # noqa: F401 - registers the `latentforge` model

    cli_evaluate()


if __name__ == "__main__":
    main()
