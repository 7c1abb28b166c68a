#!/usr/bin/env bash
# Launch training: NGPU=8 CONFIG=train_configs/llama3_8b.toml ./run_train.sh [--section.key value ...]
# Without GPUs, NGPU processes run on the CPU with gloo. LOG_RANK picks the local ranks that print on each
# node (default 0).
# COMM_MODE=fake_backend: a dry run over a fake process group of NGPU ranks (no GPU, no real collectives).
#
# Multi-node: the same command on every node, with NNODES (NGPU stays per node: the world is NNODES x NGPU),
# the first node's address as RDZV_ENDPOINT=host:port or MASTER_ADDR (+ MASTER_PORT, default 29500), and either
#   NODE_RANK=0..NNODES-1  static rendezvous: node 0 hosts it, node k holds ranks k*NGPU .. (k+1)*NGPU-1, or
#   RDZV_ID=<job id>       c10d rendezvous: nodes join in any order; it numbers them (ranks node by node).
# Without NNODES (or NNODES=1) the job is one node on a free local port, as without these variables (but a
# NODE_RANK above 0 is an error: NNODES was forgotten, and the node would train alone).
#
# Fault tolerance (torchft, docs/fault_tolerance.md): each replica group is its own run_train.sh job with
# REPLICA_ID=0..NUM_REPLICAS-1 and TORCHFT_LIGHTHOUSE=http://host:29510, the address of one lighthouse started with
# `torchft_lighthouse --min_replicas 1`. A group that dies is dropped from the quorum; restarted with the same
# command, it rejoins from a live group.
set -euo pipefail
cd "$(dirname "$0")"
NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}
CONFIG=${CONFIG:-${CONFIG_FILE:-train_configs/debug_model.toml}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
# Prefix each printed line with the global rank (torchrun's default is the local rank, the same on every node).
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-'[rank${rank}]:'}
die() { echo "error: $*" >&2; exit 2; }  # exit code 2, as the launcher's config errors
if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  # One process stands for every rank of the fake world: the plans are the same on each.
  exec env WORLD_SIZE="$NGPU" RANK=0 LOCAL_RANK=0 "$PYTHON" -m torchtitan.train --job.config_file "$CONFIG" \
    --comm.mode fake_backend "$@"
fi

# The rendezvous: a node that misreads its variables would otherwise train alone or wait for peers that never come.
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: the number of nodes must be a positive integer"
if [ -n "${NODE_RANK:-}" ] && ! { [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] && (( NODE_RANK < NNODES )); }; then
  die "NODE_RANK=$NODE_RANK must be a node number below NNODES=$NNODES (0..$((NNODES - 1))); set NNODES on every node"
fi
rdzv=(--rdzv_backend c10d --rdzv_endpoint=localhost:0)
if (( NNODES > 1 )); then
  endpoint=${RDZV_ENDPOINT:-${MASTER_ADDR:+$MASTER_ADDR:${MASTER_PORT:-29500}}}
  [ -n "$endpoint" ] || die "NNODES=$NNODES needs the first node's address: RDZV_ENDPOINT=host:port or MASTER_ADDR=host" \
    "(MASTER_PORT defaults to 29500)"
  [[ $endpoint =~ ^.+:[0-9]+$ ]] || die "rendezvous endpoint '$endpoint' must be host:port (RDZV_ENDPOINT or" \
    "MASTER_ADDR + MASTER_PORT)"
  if [ -n "${NODE_RANK:-}" ] && [ -n "${RDZV_ID:-}" ]; then
    die "set NODE_RANK (static rendezvous) or RDZV_ID (c10d rendezvous), not both"
  elif [ -n "${NODE_RANK:-}" ]; then
    rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend static --rdzv_endpoint "$endpoint")
  elif [ -n "${RDZV_ID:-}" ]; then
    rdzv=(--nnodes "$NNODES" --rdzv_id "$RDZV_ID" --rdzv_backend c10d --rdzv_endpoint "$endpoint")
  else
    die "NNODES=$NNODES needs NODE_RANK=0..$((NNODES - 1)) (this node's number) or RDZV_ID (one id for every node)"
  fi
fi

ft=()
if [ -n "${REPLICA_ID:-}" ] || [ -n "${NUM_REPLICAS:-}" ]; then
  { [[ ${REPLICA_ID:-} =~ ^(0|[1-9][0-9]*)$ ]] && [[ ${NUM_REPLICAS:-} =~ ^[1-9][0-9]*$ ]] \
    && (( REPLICA_ID < NUM_REPLICAS )); } \
    || die "REPLICA_ID=${REPLICA_ID:-} NUM_REPLICAS=${NUM_REPLICAS:-}: set both, REPLICA_ID in 0..NUM_REPLICAS-1"
  ft=(--fault_tolerance.enable --fault_tolerance.replica_id "$REPLICA_ID" --fault_tolerance.group_size "$NUM_REPLICAS")
fi

# The launcher validates the config in one process first, against the whole world of NNODES x NGPU ranks (a typo
# costs one line per node, no process group), then runs torchrun; a failed worker ends in one line too.
exec "$PYTHON" -m torchtitan.launch --nproc_per_node="$NGPU" "${rdzv[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m torchtitan.train --job.config_file "$CONFIG" ${ft[@]+"${ft[@]}"} "$@"
