#!/usr/bin/env bash
# The project's checks for a GPU machine lent for a few minutes, in at most 8 minutes on one H200:
#
#   bash bench/gpu_check.sh [OUT]        # from the repository root; OUT: $1, else $OUT, else ./gpu_check_out
#
#   1. setup       the venv as `make setup` makes it. Its torch must be a CUDA build: when it sees no GPU (the CPU
#                  build a CPU machine's pip config serves), torch is reinstalled, same version, from PyPI (whose Linux
#                  torch is the CUDA build; TORCH_INDEX_URL overrides) without the local pip config and constraints.
#                  PYTHON=/path/to/python: use that interpreter instead of the venv; setup then only checks it.
#   2. nvidia-smi  once
#   3. gpu tests   pytest -m gpu -q tests
#   4. step cost   bench/step_cost.py --device cuda --precision bf16 --shape bert-base, KD and MetaDistil k=1 and
#                  k=4 (forward_ad), few repeats: its ratio lines and each variant's peak GPU memory
#
# Each step runs under its own timeout and the next runs even if one fails; the exit status says whether all passed.
# OUT receives one log per step, step_cost.json and summary.log (six files: a lent machine returns at most eight).
set -euo pipefail
out=${1:-${OUT:-./gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

# Seconds per step: together, with time for `timeout --kill-after`, at most 8 minutes.
SETUP_S=170 SMI_S=10 TESTS_S=120 BENCH_S=150
bench_args=(--device cuda --precision bf16 --shape bert-base
            --only kd,metadistil_k1_forward_ad,metadistil_k4_forward_ad --repeats 2)
py=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run it under a timeout into OUT/NAME.log (and the console), note a failure
  local name=$1 seconds=$2 rc=0
  shift 2
  echo "== $name (at most ${seconds} s): $*" | tee -a "$out/summary.log"
  timeout --kill-after=20 "$seconds" "$@" 2>&1 | tee "$out/$name.log" || rc=$?
  echo "== $name: exit $rc after ${SECONDS} s in all" | tee -a "$out/summary.log"
  if ((rc != 0)); then failed+=("$name"); fi
}

sees_cuda() {
  "$py" - <<'PY'
import sys, torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
sys.exit(not torch.cuda.is_available())
PY
}

setup() {
  if [[ -n ${PYTHON:-} ]]; then  # an interpreter of the machine's own: check it, change nothing
    sees_cuda
    return
  fi
  make setup
  if sees_cuda; then return 0; fi
  local version
  version=$(sed -n 's/^torch==//p' constraints.txt)
  echo "!!!!!!!! the venv's torch is not a CUDA build: reinstalling torch==$version from PyPI !!!!!!!!"
  "$py" -m pip uninstall -y torch
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$py" -m pip install --index-url "${TORCH_INDEX_URL:-https://pypi.org/simple}" "torch==$version"
  sees_cuda
}
export py
export -f sees_cuda setup  # `timeout` runs programs, so the setup step runs in a child bash

rm -f "$out/summary.log"
step setup "$SETUP_S" bash -c 'set -euo pipefail; setup'
# tests/conftest.py defaults DeepSpeed to its CPU accelerator; from here on it is to use the GPU.
export DS_ACCELERATOR=cuda
step nvidia-smi "$SMI_S" nvidia-smi
step pytest_gpu "$TESTS_S" "$py" -m pytest -m gpu -q tests
step step_cost "$BENCH_S" "$py" bench/step_cost.py "${bench_args[@]}" --json "$out/step_cost.json"

echo "== step cost: time and peak GPU memory against KD" | tee -a "$out/summary.log"
grep -E '^(ratio|memory) ' "$out/step_cost.log" | tee -a "$out/summary.log" || true
if ((${#failed[@]})); then
  echo "== FAILED: ${failed[*]} (logs in $out)" | tee -a "$out/summary.log"
  exit 1
fi
echo "== all passed in ${SECONDS} s (logs in $out)" | tee -a "$out/summary.log"
