#!/usr/bin/env bash
# A real single-node Slurm on this machine, from Debian's packages (slurm-wlm, munge): slurmctld and slurmd on
# localhost, proctrack/linuxproc, task/none, select/cons_tres, one partition `debug` with every CPU (and no GPU).
# For developing and testing the sbatch scripts (tests/launch/test_slurm.py); run as root. Idempotent: a cluster that
# already answers is left as it is; a drained or down node is resumed.
#
#   launch/dev_slurm.sh            # install if missing (apt-get), configure, start, wait until the node is idle
#   launch/dev_slurm.sh stop       # stop slurmd, slurmctld and munged
#
#   SLURM_CONF_DIR (/etc/slurm)  where slurm.conf is written (only when it does not exist yet)
#   SLURM_WAIT_S (60)            how long to wait for the node to come up
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
WAIT_S=${SLURM_WAIT_S:-60}
NODE=$(hostname -s)

if [[ "${1:-}" == "stop" ]]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "launch/dev_slurm.sh: run as root (it installs packages and starts system daemons)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the key and the daemon
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "/usr/sbin/munged --force" || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf: this host, its CPUs and memory; written once (an existing file is the admin's)
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [[ ! -f "$CONF_DIR/slurm.conf" ]]; then
  CPUS=$(nproc)
  MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat > "$CONF_DIR/slurm.conf" <<EOF
# written by launch/dev_slurm.sh: a single-node development cluster
ClusterName=dev
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=300
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  echo "wrote $CONF_DIR/slurm.conf ($NODE: $CPUS CPUs, $MEM_MB MB)"
fi

start() {  # daemon name
  pgrep -x "$1" >/dev/null && return 0
  "/usr/sbin/$1" || { echo "launch/dev_slurm.sh: $1 did not start; see /var/log/slurm/$1.log" >&2; exit 1; }
}
start slurmctld
start slurmd

deadline=$((SECONDS + WAIT_S))
while true; do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle*|mixed*|allocated*|completing*) break ;;
    down*|drain*|drained*|draining*|fail*)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  if (( SECONDS > deadline )); then
    echo "launch/dev_slurm.sh: node $NODE is '${state:-not answering}' after ${WAIT_S}s; see /var/log/slurm/" >&2
    exit 1
  fi
  sleep 1
done
echo "slurm ready: $(sinfo -h -o '%P %D node(s) %c CPUs %T')"
