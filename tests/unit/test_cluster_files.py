"""cluster/: the `ray up` file, the KubeRay RayJob and the submit helper agree with the project and with each other."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RAY = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
IMAGE_TAG = re.compile(r"^[\w.-]+(/[\w.-]+)+:(?P<version>\d+\.\d+\.\d+)-gpu$")


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def image_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.MULTILINE)[-1]


def in_repo(path: str) -> Path:
    """A path inside the image (under its WORKDIR) or relative to the repository, as a path in this checkout."""
    workdir = image_workdir().rstrip("/") + "/"
    return ROOT / path.removeprefix(workdir)


def check_entrypoint(entrypoint: str, capsys, monkeypatch) -> Path:
    """The entrypoint is `metadistil sweep SPEC`, the spec exists here and passes --dry-run."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["metadistil", "sweep"] and len(argv) == 3, entrypoint
    spec = in_repo(argv[2])
    assert spec.is_file(), f"{entrypoint}: {spec} does not exist"
    monkeypatch.chdir(ROOT)  # where users run sweeps: relative paths inside specs resolve from there
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "trials" in capsys.readouterr().out
    return spec


def test_cluster_folder_holds_the_three_files():
    assert {p.name for p in CLUSTER.iterdir()} >= {"ray-cluster.yaml", "rayjob.yaml", "submit.sh"}


def test_ray_cluster_file_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on unknown or mistyped fields
    broken = copy.deepcopy(config)
    broken["worker_start_commands"] = broken.pop("worker_start_ray_commands")  # a plausible typo
    with pytest.raises(Exception, match="worker_start_commands"):
        validate_config(prepare_config(broken))


def test_ray_cluster_file_has_a_gpu_worker_the_image_shared_storage_and_mlflow():
    config = load("ray-cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in workers)
    match = IMAGE_TAG.match(config["docker"]["image"])
    assert match and match["version"] == VERSION
    options = " ".join(config["docker"]["run_options"])
    storage = load_spec(ROOT / "configs" / "sweep" / "paper_table1.yaml")[0].storage_path
    mounts = re.findall(r"--volume (\S+):(\S+)", options)
    assert any(storage.startswith(inside + "/") for _, inside in mounts), "paper_table1's storage is not shared"
    assert re.search(r"--env MLFLOW_TRACKING_URI=https?://\S+", options)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_ray_cluster_file_keeps_the_job_api_on_the_heads_loopback():
    """The dashboard runs any job it is sent: on the head's loopback `ray dashboard` reaches it through SSH (the
    containers share the host's network), and nothing else can."""
    config = load("ray-cluster.yaml")
    # the launcher runs the containers with --net=host unless an option says otherwise
    assert not [o for o in config["docker"]["run_options"] if o.startswith(("--net", "--network"))]
    starts = [shlex.split(c.partition(";")[2]) for c in config["head_start_ray_commands"] if "ray start" in c]
    hosts = [a.split("=", 1)[1] for argv in starts for a in argv if a.startswith("--dashboard-host")]
    assert hosts == ["127.0.0.1"]
    everything = [*config["head_start_ray_commands"], *config["worker_start_ray_commands"],
                  *config["docker"]["run_options"]]
    assert not [c for c in everything if "0.0.0.0" in c or "8265" in c], "the dashboard is published"


def test_rayjob_runs_a_valid_sweep_on_gpu_workers_and_shuts_down(capsys, monkeypatch):
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    sweep_spec = check_entrypoint(spec["entrypoint"], capsys, monkeypatch)
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY
    head = cluster["headGroupSpec"]["template"]["spec"]
    groups = cluster["workerGroupSpecs"]
    containers = head["containers"] + [c for g in groups for c in g["template"]["spec"]["containers"]]
    for container in containers:
        match = IMAGE_TAG.match(container["image"])
        assert match and match["version"] == VERSION, container["image"]
    gpu = [c for g in groups for c in g["template"]["spec"]["containers"]
           if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu, "no GPU worker group"
    storage = load_spec(sweep_spec)[0].storage_path
    for pod in [head, *(g["template"]["spec"] for g in groups)]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in claims]
        assert any(storage.startswith(m["mountPath"] + "/") for m in mounts), "the sweep's storage is not shared"


def test_rayjob_dashboard_serves_the_submitter_and_stays_inside_the_cluster():
    """KubeRay's submitter pod sends the job to the dashboard through the head's service, so the dashboard listens
    on the pod's network; the service stays ClusterIP and nothing publishes it."""
    cluster = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "headService" not in head and not head.get("enableIngress")
    for container in head["template"]["spec"]["containers"]:
        assert not [p for p in container.get("ports", []) if "hostPort" in p], "a port is published on the node"


def test_cluster_files_agree_on_image_and_entrypoint_spec():
    job, launcher = load("rayjob.yaml"), load("ray-cluster.yaml")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        launcher["docker"]["image"]
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)-py311-gpu$",
                     (ROOT / "docker" / "Dockerfile").read_text(), re.MULTILINE)
    assert base and base.group(1) == RAY, "the GPU image's Ray is not the project's"


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that records its arguments instead of contacting a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    (bin_dir / "ray").chmod(0o755)
    return bin_dir


def run_submit(fake_ray, args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SUBMISSION_ID")}
    return subprocess.run([str(CLUSTER / "submit.sh"), *args], capture_output=True, text=True, timeout=60, cwd="/",
                          env={**base, "PATH": f"{fake_ray}:{os.environ['PATH']}", **env}, check=False)


def test_submit_builds_the_ray_job_submit_command(fake_ray):
    uri = 'http://mlflow.internal:5000/"quoted"'
    out = run_submit(fake_ray, ["--no-wait", "configs/sweep/demo.yaml", "--resume"], RAY_ADDRESS="http://head:8265",
                     MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", SUBMISSION_ID="demo-7")
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--") + 1:] == ["metadistil", "sweep", "configs/sweep/demo.yaml", "--resume"]
    assert "--no-wait" in argv[:argv.index("--")]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--submission-id") + 1] == "demo-7"
    assert Path(argv[argv.index("--working-dir") + 1]) == ROOT  # the checkout, wherever the script is run from
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}}


def test_submit_default_id_names_the_spec(fake_ray):
    out = run_submit(fake_ray, ["configs/sweep/demo.yaml"], RAY_ADDRESS="http://h:8265", MLFLOW_TRACKING_URI="http://m")
    argv = json.loads(out.stdout)
    assert re.fullmatch(r"demo-\d{8}-\d{6}", argv[argv.index("--submission-id") + 1])


@pytest.mark.parametrize("missing", ["RAY_ADDRESS", "MLFLOW_TRACKING_URI"])
def test_submit_refuses_without_address_or_tracking_server(fake_ray, missing):
    env = {"RAY_ADDRESS": "http://h:8265", "MLFLOW_TRACKING_URI": "http://m"}
    del env[missing]
    out = run_submit(fake_ray, ["configs/sweep/demo.yaml"], **env)
    assert out.returncode != 0 and missing in out.stderr and out.stdout == ""


def test_submit_takes_ray_options_with_their_values_in_either_form(fake_ray):
    env = {"RAY_ADDRESS": "http://h:8265", "MLFLOW_TRACKING_URI": "http://m"}
    out = run_submit(fake_ray, ["--entrypoint-num-cpus", "1", "--no-wait", "--entrypoint-memory=2000", "-v",
                                "configs/sweep/demo.yaml", "--dry-run"], **env)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    options = argv[:argv.index("--")]
    assert options[options.index("--entrypoint-num-cpus") + 1] == "1"
    assert {"--no-wait", "--entrypoint-memory=2000", "-v"} <= set(options)
    assert argv[argv.index("--") + 1:] == ["metadistil", "sweep", "configs/sweep/demo.yaml", "--dry-run"]


@pytest.mark.parametrize(("args", "rc", "message"), [
    (["--help"], 0, "cluster/submit.sh [RAY JOB SUBMIT OPTIONS] SPEC"),
    (["-h"], 0, "cluster/submit.sh [RAY JOB SUBMIT OPTIONS] SPEC"),
    (["--entrypoint-num-cpus"], 2, "--entrypoint-num-cpus needs a value"),
    (["--entrypoint-num-cpus", "--no-wait", "configs/sweep/demo.yaml"], 2, "--entrypoint-num-cpus needs a value"),
    (["--address", "http://x:8265", "configs/sweep/demo.yaml"], 2, "--address is set by this script"),
    (["--no-wait"], 2, "cluster/submit.sh [RAY JOB SUBMIT OPTIONS] SPEC"),
])
def test_submit_help_and_bad_options(fake_ray, args, rc, message):
    out = run_submit(fake_ray, args, RAY_ADDRESS="http://h:8265", MLFLOW_TRACKING_URI="http://m")
    assert out.returncode == rc, out.stdout + out.stderr
    assert message in (out.stdout if rc == 0 else out.stderr)
    assert not out.stdout.startswith('["job"'), "ray job submit was called"
