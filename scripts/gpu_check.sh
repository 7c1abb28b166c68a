#!/bin/bash
# Every GPU measurement docs/performance.md asks for, in one go on one GPU (sized for one H200):
#   1. the CUDA-only tests (pytest -m cuda);
#   2. torchtitan 0.2.2's own trainer (benchmarks/torchtitan_baseline) and ours on the same rows, side by side;
#   3. our rows torchtitan has no twin for: loss options, float8 tensorwise/rowwise, OLMoE 1B-7B, blockwise
#      attention at long context with document masks and sliding windows;
#   4. a torch.profiler trace of the first shared row (rerun it with a row name to profile another).
# Results: small text files under benchmarks/results/ (or --out DIR), one per part, each headed by the date,
# GPU, torch version and command; docs/performance.md takes its rows from them.
#
# Usage: bash scripts/gpu_check.sh [--dry] [--part shared|extra|profile|all] [--wheels DIR] [--out DIR]
#        bash scripts/gpu_check.sh --fetch-wheels DIR      (on a machine with the package index)
#   --wheels DIR  wheels the GPU machine's image lacks (our trainer's torchdata/datasets/tokenizers, pytest,
#                 torchtitan 0.2.2 and its small dependencies), installed with --no-index into .whl/site;
#                 default .whl (git-ignored). --fetch-wheels downloads them for CPython 3.12 on x86-64 Linux.
#   --part        shared (tests + side-by-side rows), extra (our other rows), profile, or all (the default).
#   --dry         on a machine without a GPU: every step but the GPU rows (the wheel install, the CUDA test
#                 selection, the torchtitan runner and ours on a tiny CPU row, the plan of every GPU row).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
dry=0; part=all; wheels=.whl; out=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1 ;;
    --part) part=${2:?--part needs shared, extra, profile or all}; shift ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --fetch-wheels)
      d=${2:?--fetch-wheels needs a folder}; mkdir -p "$d"
      exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$d" torchtitan==0.2.2 torchdata==0.11.0 tyro docstring-parser typeguard shtab \
        datasets dill multiprocess xxhash tomli tiktoken tokenizers safetensors pytest iniconfig pluggy ;;
    *) echo "gpu_check.sh: unknown argument $1 (valid: --dry, --part, --wheels, --out, --fetch-wheels)"; exit 2 ;;
  esac
  shift
done
case "$part" in shared|extra|profile|all) ;; *) echo "gpu_check.sh: --part $part (valid: shared, extra, profile, all)"; exit 2 ;; esac
PY=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTORCH_ALLOC_CONF=expandable_segments:True

# What the image lacks goes into .whl/site, behind the repository (our package stays ours).
if ! "$PY" -c "import torchdata, datasets, tokenizers, pytest" 2>/dev/null; then
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY lacks torchdata/datasets/tokenizers/pytest and $wheels holds no wheels" \
         "(fetch them with: bash scripts/gpu_check.sh --fetch-wheels $wheels)"; exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$ROOT/.whl/site" "$wheels"/*.whl >/dev/null \
    || { echo "gpu_check.sh: installing $wheels/*.whl failed"; exit 2; }
  export PYTHONPATH="$ROOT:$ROOT/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi

header() {  # date, GPU, torch version, command: the fields every results file starts with
  "$PY" - "$@" <<'EOF'
import datetime, sys, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (--dry)"
print(f"# {datetime.date.today()} | {gpu} | torch {torch.__version__} | {' '.join(sys.argv[1:])}")
EOF
}
SHARED_ROWS=8b8l_compile_sacop,8b8l_eager_sacop,8b8l_compile_noac,1b_compile_noac
EXTRA_ROWS=8b8l_compile_noac_chunked_loss,8b8l_compile_noac_fused_loss,8b8l_compile_noac_float8_tensorwise,8b8l_compile_noac_float8_rowwise
EXTRA_ROWS=$EXTRA_ROWS,olmoe_1b_7b_compile_fullac,1b_seq32k_docs_compile_sacop,gemma3_1b_seq32k_window_compile_sacop
status=0

if [ "$part" = shared ] || [ "$part" = all ]; then
  f="$out/cuda_tests.txt"; cmd="$PY -m pytest -q -m cuda tests -p no:cacheprovider"
  { header "$cmd"; $cmd 2>&1 | tail -15; } > "$f"
  # exit 5: nothing selected/all skipped is fine on --dry; on a GPU every cuda test must pass
  if [ $dry = 0 ] && ! grep -qE "^[0-9]+ passed" "$f"; then status=1; fi
  grep -E "passed|failed|skipped|error" "$f" | tail -1

  f="$out/rows_shared.txt"
  if [ $dry = 1 ]; then
    # torchtitan 0.2.2 imports triton, so on CPU its runner only installs and writes its corpus; ours runs the
    # harness on a CPU row, and the shared rows are planned.
    if ls "$wheels"/torchtitan-0.2.2-*.whl >/dev/null 2>&1; then
      bash benchmarks/torchtitan_baseline/run.sh "$wheels" --prepare || status=1
    else
      echo "no torchtitan 0.2.2 wheel in $wheels: its runner was not prepared"
    fi
    cmd="$PY scripts/benchmark.py rows --rows cpu_debug --steps 4 --skip 1 --log-freq 1"
    { header "$cmd"; $cmd 2>&1; } > "$out/rows_cpu.txt"; cat "$out/rows_cpu.txt"
    grep -q "FAILED" "$out/rows_cpu.txt" && status=1
    cmd="$PY scripts/benchmark.py rows --rows $SHARED_ROWS --plan-only"
  else
    cmd="$PY scripts/benchmark.py rows --rows $SHARED_ROWS --steps 30 --skip 15"
    cmd="$cmd --baseline benchmarks/torchtitan_baseline --wheels $wheels"
  fi
  { header "$cmd"; $cmd 2>&1; } > "$f"; cat "$f"
  grep -q "FAILED" "$f" && status=1
fi

if [ "$part" = extra ] || [ "$part" = all ]; then
  f="$out/rows_extra.txt"
  if [ $dry = 1 ]; then  # each GPU row's plan (model, layout, memory estimate), no step
    cmd="$PY scripts/benchmark.py rows --rows $EXTRA_ROWS --plan-only"
  else
    cmd="$PY scripts/benchmark.py rows --rows $EXTRA_ROWS --steps 20 --skip 10"
  fi
  { header "$cmd"; $cmd 2>&1; } > "$f"; cat "$f"
  grep -q "FAILED" "$f" && status=1
fi

if [ "$part" = profile ] || [ "$part" = all ]; then
  f="$out/profile.txt"; row=${PROFILE_ROW:-8b8l_compile_sacop}
  [ $dry = 1 ] && row=cpu_debug
  cmd="$PY scripts/benchmark.py profile --row $row --out $out"
  { header "$cmd"; $cmd 2>&1; } > "$f"; tail -25 "$f"
  grep -q "FAILED" "$f" && status=1
fi
exit $status
