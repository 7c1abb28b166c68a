#!/bin/bash
# torchtitan 0.2.2's trainer on the shared rows of docs/performance.md, one GPU, before ours on the same machine.
# Usage: bash run.sh WHEEL_DIR [ROW ...]     (bash run.sh WHEEL_DIR --prepare: install and write the corpus only)
#   WHEEL_DIR holds torchtitan 0.2.2 and what it needs beyond torch (see scripts/gpu_check.sh); installed into
#   ./.site, which goes first on PYTHONPATH so `torchtitan` is that release, not this repository's package.
# Prints "== ROW (exit N)" and then the row's last torchtitan "step:" lines (scripts/benchmark.py parses them).
# Logs go to $OUT when set, else ./logs. TT_EXTRA adds overrides to every row (the --dry check shortens runs).
set -u
cd "$(dirname "$0")"
wheels=$(realpath "${1:?usage: bash run.sh WHEEL_DIR [ROW ...]}"); shift
if [ ! -d .site/torchtitan ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PWD/.site" "$wheels"/*.whl \
    >/dev/null 2>&1 || { echo "torchtitan baseline: installing the wheels of $wheels failed"; exit 2; }
fi
export PYTHONPATH="$PWD/.site" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  PYTORCH_ALLOC_CONF=expandable_segments:True
python3 write_corpus.py
if [ "${1:-}" = --prepare ]; then  # what a machine without a GPU can check (torchtitan 0.2.2 imports triton)
  ls -d .site/torchtitan-0.2.2.dist-info corpus/data.json; exit $?
fi
logs=${OUT:-logs}; mkdir -p "$logs"
declare -A ROWS=(
  [8b8l_compile_sacop]=""
  [8b8l_eager_sacop]="--compile.no-enable"
  [8b8l_compile_noac]="--activation_checkpoint.mode none"
  [1b_compile_noac]="--model.flavor 1B --training.local_batch_size 2 --activation_checkpoint.mode none"
)
[ $# -gt 0 ] || set -- 8b8l_compile_sacop 8b8l_eager_sacop 8b8l_compile_noac 1b_compile_noac
for row in "$@"; do
  [ -n "${ROWS[$row]+x}" ] || { echo "== $row (exit 2)"; echo "torchtitan baseline: no row $row"; continue; }
  # shellcheck disable=SC2086  # the overrides are words
  timeout 300 torchrun --nproc_per_node=1 --standalone entry.py --job.config_file job.toml ${ROWS[$row]} \
    ${TT_EXTRA:-} > "$logs/torchtitan_$row.log" 2>&1
  echo "== $row (exit $?)"
  sed 's/\x1b\[[0-9;]*m//g' "$logs/torchtitan_$row.log" | grep -E 'step: ' | tail -3
done
