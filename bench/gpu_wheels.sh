#!/usr/bin/env bash
# Wheels a lent GPU machine lacks, gathered here into .whl/ (ignored by git) for the device tool's `carry`.
#
#   bash bench/gpu_wheels.sh            # for the lent H200's image: Python 3.12, with torch, transformers, tokenizers,
#   PYVER=3.11 bash bench/gpu_wheels.sh  # safetensors, numpy, pandas, pyarrow, pyyaml, tqdm, pytest, ninja, psutil,
#                                        # py-cpuinfo, msgpack, einops already there, and no network
#
# What the trainer, the gpu tests and bench/step_cost.py import beyond that image: pydantic (with its compiled core),
# DeepSpeed (an sdist upstream: built into a pure-Python wheel here) and hjson, and datasets (with dill and
# multiprocess) for file loading. Versions are the ones this checkout's .venv runs (constraints.txt), so the GPU run
# checks the code CI tests. bench/gpu_check.sh installs .whl/ with `pip install --target` when it finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${PYVER:-3.12}
py=${PYTHON:-.venv/bin/python}
[[ -x $py ]] || { echo "error: $py not found; run 'make setup' first (its versions are the ones gathered)" >&2; exit 2; }
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

pins=()
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson datasets dill multiprocess \
            deepspeed; do
  pin=$("$py" -m pip freeze 2>/dev/null | grep -iE "^${name//[-_]/[-_]}==" || true)
  [[ -n $pin ]] || { echo "error: $name is not installed in $py" >&2; exit 2; }
  pins+=("$pin")
done

rm -rf .whl && mkdir .whl
binary=("${pins[@]}")
unset 'binary[-1]'  # deepspeed: built below
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${binary[@]}"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${pins[-1]}"
ls -1 .whl
du -sh .whl
