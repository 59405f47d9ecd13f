#!/usr/bin/env bash
# The torchrun command that every node of a Slurm job runs, built from the job's environment;
# printed one argument per line (slurm_stage1.sbatch reads it with mapfile).
#
#   bash examples/syne/slurm_torchrun.sh pretrain_syne.py --config CONFIG [--set KEY=VALUE ...]
#
# From the environment Slurm sets inside an allocation:
#   SLURM_JOB_NUM_NODES (or SLURM_NNODES)     -> --nnodes
#   SLURM_GPUS_ON_NODE, else the count at the end of SLURM_GPUS_PER_NODE ("8", "h100:8")
#                                             -> --nproc_per_node
#   the first host of SLURM_JOB_NODELIST       -> the c10d rendezvous endpoint, port
#                                                 MEGASYNE_RDZV_PORT (default 29500)
#   SLURM_JOB_ID and SLURM_RESTART_COUNT       -> --rdzv-id (a requeued job keeps its id;
#                                                 the restart count makes each launch its own)
# MEGASYNE_RDZV_HOST overrides the rendezvous host (and then scontrol is not needed).
#
# Every node runs the same command: with the c10d rendezvous, torchrun agrees on node ranks
# itself (no --node_rank, no MASTER_ADDR to export), and the torchrun on the first host
# serves the rendezvous store.
set -euo pipefail

die() {
  echo "error: slurm_torchrun.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || die "usage: slurm_torchrun.sh SCRIPT [ARGS...] (e.g. pretrain_syne.py --config ...)"

nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
[[ $nnodes =~ ^[1-9][0-9]*$ ]] ||
  die "SLURM_JOB_NUM_NODES is '${nnodes}': run this inside a Slurm allocation (sbatch, salloc)"

gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
  gpus=${SLURM_GPUS_PER_NODE##*:}   # "h100:8" -> "8"
  gpus=${gpus%%(*}                  # "8(S:0-1)" -> "8"
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] ||
  die "cannot tell the GPUs per node (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'," \
      "SLURM_GPUS_PER_NODE='${SLURM_GPUS_PER_NODE:-}'): ask for them with --gpus-per-node=N"

host=${MEGASYNE_RDZV_HOST:-}
if [[ -z $host ]]; then
  [[ -n ${SLURM_JOB_NODELIST:-} ]] ||
    die "SLURM_JOB_NODELIST is not set: run inside a Slurm allocation or set MEGASYNE_RDZV_HOST"
  # sed reads the whole list: `head -n 1` would exit early and, under pipefail, fail the
  # script whenever scontrol is still writing (SIGPIPE, status 141; seen with 8 nodes).
  host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  [[ -n $host ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
fi
port=${MEGASYNE_RDZV_PORT:-29500}
[[ $port =~ ^[0-9]+$ ]] || die "MEGASYNE_RDZV_PORT is '${port}', not a port number"
[[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: run this inside a Slurm allocation"

printf '%s\n' torchrun \
  --nnodes "$nnodes" --nproc_per_node "$gpus" \
  --rdzv-backend c10d --rdzv-endpoint "$host:$port" \
  --rdzv-id "megasyne-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}" \
  "$@"
