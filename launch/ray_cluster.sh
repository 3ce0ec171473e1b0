#!/usr/bin/env bash
# Start a Ray cluster over the nodes of the current Slurm allocation: the head on the first node, one worker on
# each other node; blocks until every node has joined. Used by launch/grpo.sbatch (source it, or run it and then
# start the driver with rl.ray_address=auto on the head node).
#
#   RAY_HEAD_IP (the head node's first address)  the address the head binds and the workers join
#   RAY_PORT (6379)                                the head's GCS port
#   RAY_CPUS_PER_NODE (the allocation's CPUs)      CPUs each node offers to Ray
#   RAY_WAIT_S (600)                               how long to wait for all nodes
# It gives up at once, saying why, when the head dies or a node is refused for authentication (a stray
# ~/.ray/auth_token or RAY_AUTH_MODE=token on one side only).
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
RAY_WAIT_S=${RAY_WAIT_S:-600}
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD_NODE=${NODES[0]}
HEAD_IP=${RAY_HEAD_IP:-$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" --overlap hostname --ip-address | awk '{print $1}')}
GPUS=${SLURM_GPUS_ON_NODE:-0}
CPUS=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"

echo "ray head $HEAD_NODE ($RAY_ADDRESS), ${#NODES[@]} node(s) x $GPUS GPU(s) x $CPUS CPU(s)"
# --block keeps each srun step alive for the whole job; the steps end when the job does
srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" --overlap \
  ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-gpus="$GPUS" --num-cpus="$CPUS" \
    --include-dashboard=false --block &
HEAD_PID=$!
sleep 10
for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" --overlap \
    ray start --address="$RAY_ADDRESS" --num-gpus="$GPUS" --num-cpus="$CPUS" --block &
done

# exit 0: every node is up; 1: not yet; 3: refused (authentication), with the reason on stderr
ray_nodes_up() {
  python - "$RAY_ADDRESS" "${#NODES[@]}" <<'PY'
import sys
try:
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    alive = sum(1 for n in ray.nodes() if n["Alive"])
except Exception as error:  # noqa: BLE001 - classify, then report
    text = f"{type(error).__name__}: {error}"
    if any(word in text.lower() for word in ("auth", "token", "unauthenticated", "permission denied")):
        print(text, file=sys.stderr)
        sys.exit(3)
    sys.exit(1)
sys.exit(0 if alive >= int(sys.argv[2]) else 1)
PY
}

deadline=$((SECONDS + RAY_WAIT_S))
while true; do
  status=0
  ray_nodes_up 2>/tmp/ray_cluster_$$.err || status=$?
  if (( status == 0 )); then break; fi
  if (( status == 3 )); then
    echo "ray_cluster.sh: the Ray head at $RAY_ADDRESS refused this client: $(tail -n 1 /tmp/ray_cluster_$$.err)." \
         "Token authentication is on for one side only: remove the stray ~/.ray/auth_token (or set RAY_AUTH_MODE" \
         "the same for head, workers and driver)" >&2
    exit 1
  fi
  if ! kill -0 "$HEAD_PID" 2>/dev/null; then
    echo "ray_cluster.sh: the Ray head on $HEAD_NODE exited; see its output above" >&2
    exit 1
  fi
  if (( SECONDS > deadline )); then
    echo "ray_cluster.sh: only part of the Ray cluster came up within ${RAY_WAIT_S}s" >&2
    exit 1
  fi
  sleep 5
done
rm -f /tmp/ray_cluster_$$.err
echo "ray cluster ready: ${#NODES[@]} node(s)"
