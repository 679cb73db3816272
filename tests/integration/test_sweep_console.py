"""What `metadistil sweep` prints and what it leaves behind: Tune's table with the trials' axes, each trial's lines
under its id (never merged with another trial's), no library notices unless -v, and no Ray processes of the local
Ray it started once it ends, however it ends."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModel, AutoTokenizer

import launcher.driver
from launcher.cli import main

METADISTIL = str(Path(sys.executable).parent / "metadistil")
TRIALS = ["kd__bert__headless__w0__off__s1", "kd__bert__headless__w0__off__s2"]  # equal but for digits


@pytest.fixture
def spec(tmp_path, model_dirs):
    """Two KD trials that differ only in their seed, on a student without a classification head: loading it makes
    transformers print its load report ("classifier.weight | MISSING") in every trial."""
    headless = tmp_path / "headless"
    AutoModel.from_pretrained(model_dirs["bert"]).save_pretrained(headless)
    AutoTokenizer.from_pretrained(model_dirs["bert"]).save_pretrained(headless)
    spec = {
        "name": "console",
        "base": {"data": {"name": "synthetic", "train_size": 64, "quiz_size": 16, "validation_size": 32,
                          "test_size": 32, "max_length": 32},
                 "optim": {"lr": 3e-3, "batch_size": 16, "max_steps": 2}, "eval": {"every_steps": 1},
                 "deepspeed": {"enabled": True}, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
        "teachers": {"bert": {"checkpoint": model_dirs["bert"], "label": "BERT"}},
        "teacher_sets": {"bert": ["bert"]},
        "students": {"headless": {"name": str(headless), "label": "Headless"}},
        "grid": {"algorithm": ["kd"], "seed": [1, 2]},
        "resources": {"cpus": 1}, "max_concurrent_trials": 2, "max_failures": 0,
        "storage_path": str(tmp_path / "storage"),
    }
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def ray_tmp(monkeypatch):
    """Ray's temporary folder for this test alone (short: Ray's socket paths must fit in 107 characters), so its
    processes can be told from other Rays on the machine."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def processes_of(folder: str) -> list[str]:
    """Processes with ``folder`` in their command line or among their open files: Ray's raylet, GCS, dashboard,
    agents (whose command lines Ray rewrites) and workers of the sessions under it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if folder in command or any(folder in f for f in files):
            found.append(f"{pid} {command[:80]}")
    return found


def left_after(folder: str, seconds: float = 20) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := processes_of(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_console_shows_axes_and_trial_lines_and_no_ray_is_left(spec, ray_tmp):
    out = subprocess.run([METADISTIL, "sweep", str(spec), "--no-report"], check=False, capture_output=True,
                         text=True, timeout=540, env=os.environ)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]

    headers = [line for line in text.splitlines() if line.startswith("| Trial name")]
    assert headers, text[-3000:]
    columns = [c.strip() for c in headers[-1].strip("|").split("|")]
    assert columns[3:9] == ["algorithm", "teachers", "student", "warmup", "noise", "seed"]
    assert {"best val acc", "test acc"} <= set(columns)
    final = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in TRIALS:
            final[cells[0]] = dict(zip(columns, cells))
    for trial, seed in zip(TRIALS, ("1", "2")):
        row = final[trial]
        assert (row["status"], row["algorithm"], row["teachers"], row["student"], row["seed"]) == \
            ("TERMINATED", "kd", "BERT", "Headless", seed)
        assert 0 <= float(row["best val acc"]) <= 1 and 0 <= float(row["test acc"]) <= 1

    # Each trial's evaluations, under its own id: Ray would merge these lines (they differ only in digits).
    for trial in TRIALS:
        for step in (1, 2):
            assert re.search(rf"\[{trial}\] \[step {step}\] best_val_accuracy=", text), (trial, step)
    assert not [line for line in text.splitlines() if "[step" in line and "repeated" in line]
    assert "LOAD REPORT" not in text and "Loading weights" not in text and "built successfully" not in text
    assert left_after(ray_tmp) == []


@pytest.mark.parametrize(("error", "rc", "message"), [
    (RuntimeError("token cache broke"), 1, "RuntimeError: token cache broke"),
    pytest.param(KeyboardInterrupt(), 130, "interrupted", marks=pytest.mark.slow),  # the same path, another start
])
def test_the_local_ray_is_stopped_when_the_sweep_fails(spec, ray_tmp, monkeypatch, capsys, error, rc, message):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of another test is running in this process")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the driver sets it, undone after the test
    started = []

    def fail(configs):  # the first step after Ray started
        started.append(ray.is_initialized())
        raise error

    monkeypatch.setattr(launcher.driver, "prepare_token_caches", fail)
    assert main(["sweep", str(spec), "--no-report"]) == rc
    assert started == [True] and message in capsys.readouterr().err
    assert not ray.is_initialized()
    assert left_after(ray_tmp) == []


@pytest.mark.slow
def test_a_terminated_sweep_stops_its_ray(spec, ray_tmp):
    """SIGTERM (`kill`, `timeout`, a Kubernetes pod stopping) while trials run."""
    process = subprocess.Popen([METADISTIL, "sweep", str(spec), "--no-report"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=os.environ)
    try:
        for line in process.stdout:
            if "] [step " in line:  # a trial runs
                break
        assert processes_of(ray_tmp), "no Ray processes found while the sweep ran"
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    assert left_after(ray_tmp) == []
