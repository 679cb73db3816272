#!/usr/bin/env bash
# The project's checks for a GPU machine lent for a few minutes, in at most 8 minutes on one H200:
#
#   bash bench/gpu_check.sh [OUT]        # from the repository root; OUT: $1, else $OUT, else ./gpu_check_out
#
#   1. setup       the interpreter. PYTHON=/path/to/python: that one, unchanged. Else, with a .whl/ folder (carried to
#                  a lent machine, which has no network: `bash bench/gpu_wheels.sh` here gathers it): the machine's
#                  python3 (it holds a CUDA torch) with .whl/ installed into a folder of its own (pip --target, no
#                  index) and this checkout on PYTHONPATH. Else the venv as `make setup` makes it; when its torch sees
#                  no GPU (the CPU build a CPU machine's pip config serves), torch is reinstalled, same version, from
#                  PyPI (whose Linux torch is the CUDA build; TORCH_INDEX_URL overrides) without the local pip config
#                  and constraints.
#   2. nvidia-smi  once
#   3. gpu tests   pytest -m gpu on the test files that have gpu tests (the others import ray and mlflow, which a
#                  lent machine need not have)
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
  elif [[ -d .whl ]]; then  # a lent machine: its python3 and the carried wheels, nothing fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    sees_cuda
  else
    make setup
    if sees_cuda; then return 0; fi
    local version
    version=$(sed -n 's/^torch==//p' constraints.txt)
    echo "!!!!!!!! the venv's torch is not a CUDA build: reinstalling torch==$version from PyPI !!!!!!!!"
    "$py" -m pip uninstall -y torch
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
      "$py" -m pip install --index-url "${TORCH_INDEX_URL:-https://pypi.org/simple}" "torch==$version"
    sees_cuda
  fi
}
site=/tmp/metadistil-site
if [[ -z ${PYTHON:-} && -d .whl ]]; then
  py=python3
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export py site
export -f sees_cuda setup  # `timeout` runs programs, so the setup step runs in a child bash

rm -f "$out/summary.log"
step setup "$SETUP_S" bash -c 'set -euo pipefail; setup'
# tests/conftest.py defaults DeepSpeed to its CPU accelerator; from here on it is to use the GPU.
export DS_ACCELERATOR=cuda
step nvidia-smi "$SMI_S" nvidia-smi
mapfile -t gpu_tests < <(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu' tests | sort)
step pytest_gpu "$TESTS_S" "$py" -m pytest -m gpu -q -rs "${gpu_tests[@]}"
step step_cost "$BENCH_S" "$py" bench/step_cost.py "${bench_args[@]}" --json "$out/step_cost.json"

echo "== step cost: time and peak GPU memory against KD" | tee -a "$out/summary.log"
grep -E '^(ratio|memory) ' "$out/step_cost.log" | tee -a "$out/summary.log" || true
if ((${#failed[@]})); then
  echo "== FAILED: ${failed[*]} (logs in $out)" | tee -a "$out/summary.log"
  exit 1
fi
echo "== all passed in ${SECONDS} s (logs in $out)" | tee -a "$out/summary.log"
