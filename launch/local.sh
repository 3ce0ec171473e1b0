#!/usr/bin/env bash
# Pretrain on this machine: one process per GPU (or NPROC processes on CPU, over gloo).
#   launch/local.sh recipe=tiny                       # all local GPUs, or 2 CPU processes without CUDA
#   NPROC=4 launch/local.sh recipe=tiny parallel=...  # explicit process count
#   launch/local.sh recipe=super_120b --dry-run       # print the layout and memory plan, allocate nothing
# Any Hydra override (train.steps=50, optim.lr=1e-3, ...) passes through.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
# --standalone: a local c10d rendezvous on a free port; the run directory comes from train.run_name / train.run_dir
# (latentforge.launch.torchrun: torchrun whose SIGTERM saves a checkpoint and exits 0)
exec python -m latentforge.launch.torchrun --standalone --nproc-per-node "$NPROC" train/pretrain.py "$@"
