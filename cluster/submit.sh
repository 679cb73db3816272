#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [RAY JOB SUBMIT OPTIONS] SPEC [METADISTIL SWEEP OPTIONS]
#   cluster/submit.sh configs/sweep/demo.yaml                 # wait, streaming the driver's log
#   cluster/submit.sh --no-wait configs/sweep/demo.yaml       # return at once; follow with `ray job logs -f ID`
#   cluster/submit.sh configs/sweep/demo.yaml --resume        # a new job that finishes an interrupted sweep
#
# RAY_ADDRESS          the head's dashboard, e.g. http://127.0.0.1:8265 (required): a port forwarded by
#                      `ray dashboard cluster/ray-cluster.yaml` or `kubectl port-forward`, or http://<head>:8265
#                      from inside the cluster; its job API runs anything, so keep it off public networks
# MLFLOW_TRACKING_URI  the MLflow server as the cluster's nodes reach it (required: without it the sweep would log
#                      to a SQLite file inside the job's temporary working dir and lose it)
# SUBMISSION_ID        the job's id (default: the spec's file name and the UTC time)
#
# The job's working dir is this checkout (files ignored by .gitignore stay behind), so the cluster runs the code and
# configs you have here; HF_HUB_OFFLINE, HF_HOME and the trials' library notices (TRANSFORMERS_VERBOSITY=error,
# HF_HUB_DISABLE_PROGRESS_BARS=1, METADISTIL_QUIET_LIBRARIES=1 quiet them, as a local sweep does) travel with
# MLFLOW_TRACKING_URI when they are set. Credentials belong in the cluster's own environment, not here: runtime-env
# variables are shown in the Ray dashboard.
set -euo pipefail

usage() { sed -n '2,20p' "$0"; }
# `ray job submit` options that take no value; every other option takes one, as `--opt=value` or `--opt value`.
flags=" --no-wait -v --verbose "
submit_opts=()
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        --address | --address=* | --submission-id | --submission-id=* | --working-dir | --working-dir=* | \
            --runtime-env-json | --runtime-env-json=*)
            echo "cluster/submit.sh: $1 is set by this script (RAY_ADDRESS, SUBMISSION_ID, this checkout, the" \
                 "MLflow env); call ray job submit directly to change it" >&2
            exit 2 ;;
    esac
    submit_opts+=("$1")
    if [[ $1 != *=* && $flags != *" $1 "* ]]; then
        if [[ $# -lt 2 || $2 == -* ]]; then
            echo "cluster/submit.sh: $1 needs a value (e.g. $1 VALUE or $1=VALUE)" >&2
            exit 2
        fi
        submit_opts+=("$2")
        shift
    fi
    shift
done
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
spec=$1
shift
for name in RAY_ADDRESS MLFLOW_TRACKING_URI; do
    if [[ -z ${!name:-} ]]; then
        echo "cluster/submit.sh: set $name (see the top of this script)" >&2
        exit 2
    fi
done

root=$(cd "$(dirname "$0")/.." && pwd)
id=${SUBMISSION_ID:-$(basename "$spec" .yaml)-$(date -u +%Y%m%d-%H%M%S)}
# JSON built by Python, so URIs with quotes or backslashes cannot break it.
runtime_env=$(python3 -c '
import json, os
names = ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
         "METADISTIL_QUIET_LIBRARIES")
print(json.dumps({"env_vars": {n: os.environ[n] for n in names if os.environ.get(n)}}))')

exec ray job submit --address "$RAY_ADDRESS" --submission-id "$id" --working-dir "$root" \
    --runtime-env-json "$runtime_env" "${submit_opts[@]}" -- metadistil sweep "$spec" "$@"
