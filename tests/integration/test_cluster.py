"""Real Ray and MLflow servers on 127.0.0.1: the README's `ray job submit` of the demo sweep on a two-node cluster,
an unreachable tracking server, a node lost mid-sweep and a driver lost mid-sweep then resumed.

Every process is started in a session of its own and its whole process group is killed at the end, also when a test
fails; nothing else using Ray on this machine is touched (no `ray stop`). Ports are free ports, Ray's temp dir is
private. Node loss and driver loss use a small generated spec (tiny models, 6 trials, ``small_spec``) so the module
stays within minutes; the submission test runs configs/sweep/demo.yaml as the README shows it, every trial and teacher
cut to 2 steps by spec overrides (``demo_shrunk``): the full demo takes about 5 minutes of 2 CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.identity import NODE

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray, mlflow and metadistil
README_SUBMIT = "cluster/submit.sh configs/sweep/demo.yaml"
DEMO = ROOT / "configs" / "sweep" / "demo.yaml"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port from 20000-32767: below the kernel's ephemeral range (32768+), which is where every socket Ray's
    own processes bind to port 0 lands, and above Ray's worker ports (10002-19999). A port picked from the ephemeral
    range can be taken by one of them between being picked and being used (seen: the head's client server dying with
    EADDRINUSE, and the whole head with it)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-32767")


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Group:
    """A command in its own session; ``kill`` ends it and every process it spawned (Ray workers included)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=log.parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        # Members other than the leader may still be exiting (and writing logs); give them a moment, no more: an
        # orphaned zombie keeps the group "alive" until something reaps it.
        for _ in range(50):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class Cluster:
    """A Ray head (dashboard on) plus worker nodes, each a `ray start --block` with 1 CPU, on 127.0.0.1."""

    def __init__(self, root: Path):
        # Ray's socket paths must stay under 107 characters: a short private temp dir, not pytest's tmp_path.
        self.temp = Path(tempfile.mkdtemp(prefix="mdray", dir="/tmp"))
        self.root, self.gcs, self.dashboard = root, free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        self.env.pop("RAY_ADDRESS", None)
        self.head: Group | None = None
        self.workers: list[Group] = []

    def _node(self, name: str, extra: list[str]) -> Group:
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        # A temp dir per node, as on separate machines: nodes sharing one would unpack the job's working dir into
        # the same folder, one replacing it under the other's running driver.
        args = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp / name}", *ports, *extra]
        return Group(args, self.env, self.root / f"{name}.log")

    def start(self) -> None:
        self.head = self._node("head", ["--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                                        "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                                        "--include-dashboard=true"])
        wait_for("the Ray dashboard", lambda: _answers(f"{self.address}/api/version"), 120)

    def alive_nodes(self) -> list[str]:
        from ray.util.state import list_nodes

        return [n.node_id for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")])]

    def ensure_worker(self) -> None:
        """Two alive nodes: add a worker if there is none (the node-loss test kills one)."""
        if len(self.alive_nodes()) >= 2:
            return
        self.workers.append(self._node(f"worker{len(self.workers)}", [f"--address=127.0.0.1:{self.gcs}"]))
        wait_for("the worker node to join", lambda: len(self.alive_nodes()) >= 2, 120)

    def lose_worker(self) -> None:
        """Node loss: SIGKILL the worker's raylet, agents and trial processes at once."""
        self.workers[-1].kill()

    def stop(self) -> None:
        for group in [*self.workers, self.head]:
            if group:
                group.kill()
        shutil.rmtree(self.temp, ignore_errors=True)

    def run(self, command: str, extra_env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """A shell command from the repository root, as a user types it, with RAY_ADDRESS pointing here."""
        env = {**self.env, "RAY_ADDRESS": self.address, **extra_env}
        return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def job(self, submission_id: str):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).get_job_info(submission_id)

    def trial_nodes(self, submission_id: str, state: str | None = None) -> dict[int, str]:
        """{pid: node id} of the job's Tune trial actors (function trainables are ``ImplicitFunc`` actors)."""
        from ray.util.state import list_actors

        job_id = self.job(submission_id).job_id
        if job_id is None:  # the driver never connected to Ray
            return {}
        # The state API's class_name filter missed live actors here; filter the job's actors in Python instead.
        filters = [("job_id", "=", job_id)] + ([("state", "=", state)] if state else [])
        return {a.pid: a.node_id for a in list_actors(address=self.address, filters=filters, detail=True,
                                                       limit=10_000) if a.class_name == "ImplicitFunc" and a.node_id}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on SQLite with proxied artifacts, as the README runs it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = Group([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1"], {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                   root / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for("the MLflow server", lambda: _answers(f"{uri}/health") or not server.alive(), 180)
        assert server.alive(), (root / "server.log").read_text()[-3000:]
        yield uri
    finally:
        server.kill()


def small_spec(tmp_path: Path, model_dirs, name: str, steps: int) -> Path:
    """Six trials on tiny models (a ready BERT teacher: no teacher stage) of ``steps`` steps, checkpointing every 10."""
    spec = {
        "name": name,
        "base": {"data": {"name": "synthetic", "train_size": 320, "quiz_size": 16, "validation_size": 64,
                          "test_size": 64, "max_length": 32},
                 "optim": {"lr": 3e-3, "batch_size": 16, "epochs": 50, "max_steps": steps}, "eval": {"every_steps": 10},
                 "metadistil": {"quiz_batch_size": 8}, "deepspeed": {"enabled": False}},
        "teachers": {"bert": {"checkpoint": model_dirs["bert"], "label": "BERT"}},
        "teacher_sets": {"bert": ["bert"]},
        "students": {"distil": {"name": model_dirs["distilbert"], "label": "DistilBERT"}},
        "grid": {"algorithm": ["finetune", "kd", "metadistil"], "seed": [1, 2]},
        "resources": {"cpus": 1}, "max_concurrent_trials": 2, "max_failures": 2,
        "storage_path": str(tmp_path / "storage"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def demo_shrunk() -> list[str]:
    """Spec overrides that keep the demo's grid, teachers and data but run 2 steps per trial and teacher, evaluated
    on 64 examples. A teacher's own ``overrides`` (its step budget) are replaced whole: their keys hold dots."""
    spec = yaml.safe_load(DEMO.read_text())
    small = {"optim.max_steps": 2, "eval.every_steps": 2}
    shrunk = ["base.optim.max_steps=2", "base.eval.every_steps=2", "base.data.validation_size=64",
              "base.data.test_size=64"]
    for name, teacher in spec["teachers"].items():
        if teacher.get("finetune"):
            overrides = {**teacher["finetune"].get("overrides", {}), **small}
            shrunk.append(f"teachers.{name}.finetune.overrides={json.dumps(overrides)}")
    return shrunk


def sweep_runs(uri: str, sweep: str) -> tuple[list, list]:
    """(parent runs, child runs) of a sweep on the server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name("metadistil")
    if found is None:  # the first sweep has not created it yet
        return [], []
    exp = found.experiment_id
    parents = client.search_runs([exp], f"tags.`{runs.SWEEP}` = '{sweep}' and tags.`{runs.ROLE}` = 'sweep'")
    kids = [r for p in parents for r in
            client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'", max_results=1000)]
    return parents, kids


def submitted_id(output: str) -> str:
    found = re.search(r"Job '([^']+)' submitted successfully", output)
    assert found, output[-3000:]
    return found.group(1)


def report(uri: str, sweep: str, tmp_path: Path) -> str:
    out = subprocess.run([str(BIN / "metadistil"), "report", "--sweep", sweep], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=False, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_unreachable_mlflow_refuses_before_any_trial(cluster, tmp_path, model_dirs):
    cluster.ensure_worker()
    dead = f"http://127.0.0.1:{free_port()}"
    spec = small_spec(tmp_path, model_dirs, "unreachable", steps=20)
    out = cluster.run(f"cluster/submit.sh {spec}", {"MLFLOW_TRACKING_URI": dead}, timeout=300)
    job = submitted_id(out.stdout + out.stderr)
    assert out.returncode == 1
    status = cluster.run(f"ray job status {job}", {}, timeout=60)
    assert f"Job '{job}' failed" in status.stdout + status.stderr and cluster.job(job).status == "FAILED"
    logs = cluster.run(f"ray job logs {job}", {}, timeout=60).stdout
    assert f"MLflow tracking server {dead} is unreachable" in logs
    assert cluster.trial_nodes(job) == {}, "a trial started although the tracking server was unreachable"
    assert not (tmp_path / "storage").exists()


def test_readme_job_submit_runs_demo_on_both_nodes(cluster, mlflow_server, tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert f"\n{README_SUBMIT}" in readme, "the README no longer shows the command this test runs"
    cluster.ensure_worker()
    nodes = set(cluster.alive_nodes())
    job = f"readme-demo-{int(time.time())}"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "SUBMISSION_ID": job}
    submit = cluster.run(f"{README_SUBMIT} {shlex.join(demo_shrunk())}", env, timeout=1500)
    out = submit.stdout + submit.stderr
    assert submitted_id(out) == job
    assert submit.returncode == 0 and cluster.job(job).status == "SUCCEEDED", out[-5000:]

    from launcher.spec import expand, load_spec

    plan = expand(*load_spec(DEMO, demo_shrunk()))
    parents, kids = sweep_runs(mlflow_server, "demo")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    expected = {t.id for t in plan.trials} | {t.id for t in plan.teacher_trials.values()}
    assert sorted(r.data.tags[runs.TRIAL_ID] for r in kids) == sorted(expected)
    assert all(r.info.status == "FINISHED" for r in kids)
    # every trial tags its run with its node: a finished job's actors vanish from Ray's state API too soon to be read
    ran_on = {r.data.tags.get(NODE) for r in kids}
    assert ran_on == nodes, f"trials ran on {ran_on}, not on both nodes {nodes}"
    table = report(mlflow_server, "demo", tmp_path)
    assert f"{len(expected)} teacher and trial runs, 0 failed" in table
    assert "| Methods | Accuracy |" in table and "*Student Model with MetaDistil*" in table
    assert (tmp_path / "runs" / "reports" / "demo" / "report.csv").is_file()


def test_driver_loss_then_resume_finishes_only_unfinished(cluster, mlflow_server, tmp_path, model_dirs):
    cluster.ensure_worker()
    spec = small_spec(tmp_path, model_dirs, "driverloss", steps=60)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    out = cluster.run(f"cluster/submit.sh --no-wait {spec}", env, timeout=300)
    job = submitted_id(out.stdout + out.stderr)

    def some_finished():
        finished = [r for r in sweep_runs(mlflow_server, "driverloss")[1] if r.info.status == "FINISHED"]
        return len(finished) >= 2 and finished

    wait_for("two trials of the first submission to finish", some_finished, 600, every=0.5)
    stop = cluster.run(f"ray job stop {job}", {}, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert cluster.job(job).status == "STOPPED"
    before = {r.data.tags[runs.TRIAL_ID]: r for r in sweep_runs(mlflow_server, "driverloss")[1]}
    done = {t for t, r in before.items() if r.info.status == "FINISHED"}
    assert 2 <= len(done) < 6, "the driver was stopped too late to leave unfinished trials"

    again = cluster.run(f"cluster/submit.sh {spec} --resume", env, timeout=900)
    assert again.returncode == 0, again.stdout[-5000:]
    assert f"{6 - len(done)} trials ran, {len(done)} already finished, 0 failed" in again.stdout
    parents, kids = sweep_runs(mlflow_server, "driverloss")
    assert len(parents) == 1, "the resumed sweep must continue the same parent run"
    after = {r.data.tags[runs.TRIAL_ID]: r for r in kids}
    assert len(kids) == len(after) == 6 and all(r.info.status == "FINISHED" for r in kids)
    for trial in done:  # finished trials were not run again
        assert after[trial].info.end_time == before[trial].info.end_time


def test_node_loss_retries_lost_trials_from_checkpoint(cluster, mlflow_server, tmp_path, model_dirs):
    cluster.ensure_worker()
    spec = small_spec(tmp_path, model_dirs, "nodeloss", steps=150)
    out = cluster.run(f"cluster/submit.sh --no-wait {spec}", {"MLFLOW_TRACKING_URI": mlflow_server}, timeout=300)
    job = submitted_id(out.stdout + out.stderr)
    head = _head_node_id(cluster)

    def worker_trial_checkpointed() -> str | None:
        """A trial on the worker node that has saved a checkpoint (a trial process's cwd is its Tune trial folder)."""
        assert cluster.job(job).status in ("PENDING", "RUNNING"), "the sweep ended before a node could be lost"
        for pid, node in cluster.trial_nodes(job, state="ALIVE").items():
            try:
                trial = Path(os.readlink(f"/proc/{pid}/cwd")).name
            except OSError:
                continue  # it just ended
            checkpoint = tmp_path / "storage" / "nodeloss" / "trials" / trial / "checkpoint"
            if node != head and checkpoint.is_dir() and any(checkpoint.iterdir()):
                return trial
        return None

    lost = wait_for("a checkpointed trial on the worker node", worker_trial_checkpointed, 600, every=0.5)
    cluster.lose_worker()
    status = wait_for("the sweep to end", lambda: cluster.job(job).status in ("SUCCEEDED", "FAILED", "STOPPED")
                      and cluster.job(job).status, 900, every=2)
    logs = cluster.run(f"ray job logs --follow {job}", {}, timeout=120).stdout
    assert status == "SUCCEEDED", logs[-5000:]
    _, kids = sweep_runs(mlflow_server, "nodeloss")
    by_id = {r.data.tags[runs.TRIAL_ID]: r for r in kids}
    assert len(kids) == len(by_id) == 6, "a retried trial duplicated its MLflow run"
    assert all(r.info.status == "FINISHED" for r in kids)
    assert int(by_id[lost].data.tags.get("resumed_from_step", 0)) > 0, f"{lost} did not resume from its checkpoint"
    table = report(mlflow_server, "nodeloss", tmp_path)
    assert "6 teacher and trial runs, 0 failed" in table and "Failed trials" not in table


def _head_node_id(cluster: Cluster) -> str:
    from ray.util.state import list_nodes

    return next(n.node_id for n in list_nodes(address=cluster.address, filters=[("is_head_node", "=", True)]))
