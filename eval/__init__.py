"""Evaluation with lm-evaluation-harness: `latentforge-eval` and the registered lm-eval model `latentforge`
(eval/harness.py), local offline tasks (eval/tasks). Imports rl/ (the inference engine): above rl in the
dependency order kernels <- model <- train <- rl <- eval."""
