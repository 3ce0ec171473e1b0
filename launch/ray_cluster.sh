#!/usr/bin/env bash
# Start a Ray cluster over the nodes of the current Slurm allocation: the head on the first node, one worker on
# each other node; blocks until every node has joined. Used by launch/grpo.sbatch (source it, or run it and then
# start the driver with rl.ray_address=auto on the head node).
#
#   RAY_PORT (6379)   the head's GCS port
#   RAY_WAIT_S (600)  how long to wait for all nodes
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
RAY_WAIT_S=${RAY_WAIT_S:-600}
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD_NODE=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')
GPUS=${SLURM_GPUS_ON_NODE:-0}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"

echo "ray head $HEAD_NODE ($RAY_ADDRESS), ${#NODES[@]} node(s) x $GPUS GPU(s) x $CPUS CPU(s)"
# --block keeps each srun step alive for the whole job; the steps end when the job does
srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" --overlap \
  ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-gpus="$GPUS" --num-cpus="$CPUS" \
    --include-dashboard=false --block &
sleep 10
for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" --overlap \
    ray start --address="$RAY_ADDRESS" --num-gpus="$GPUS" --num-cpus="$CPUS" --block &
done

deadline=$((SECONDS + RAY_WAIT_S))
until python - "$RAY_ADDRESS" "${#NODES[@]}" <<'PY'
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
alive = sum(1 for n in ray.nodes() if n["Alive"])
sys.exit(0 if alive >= int(sys.argv[2]) else 1)
PY
do
  if (( SECONDS > deadline )); then
    echo "only part of the Ray cluster came up within ${RAY_WAIT_S}s" >&2
    exit 1
  fi
  sleep 5
done
echo "ray cluster ready: ${#NODES[@]} node(s)"
