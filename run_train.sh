#!/usr/bin/env bash
# Launch training: NGPU=8 CONFIG=train_configs/llama3_8b.toml ./run_train.sh [--section.key value ...]
# Without GPUs, NGPU processes run on the CPU with gloo. LOG_RANK picks the ranks that print (default 0).
# COMM_MODE=fake_backend: a dry run over a fake process group of NGPU ranks (no GPU, no real collectives).
set -euo pipefail
cd "$(dirname "$0")"
NGPU=${NGPU:-1}
LOG_RANK=${LOG_RANK:-0}
CONFIG=${CONFIG:-${CONFIG_FILE:-train_configs/debug_model.toml}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  # One process stands for every rank of the fake world: the plans are the same on each.
  exec env WORLD_SIZE="$NGPU" RANK=0 LOCAL_RANK=0 "$PYTHON" -m torchtitan.train --job.config_file "$CONFIG" \
    --comm.mode fake_backend "$@"
fi
# The launcher validates the config in one process first (a typo costs one line, no process group), then
# runs torchrun; a failed worker ends in one line too.
exec "$PYTHON" -m torchtitan.launch --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m torchtitan.train --job.config_file "$CONFIG" "$@"
