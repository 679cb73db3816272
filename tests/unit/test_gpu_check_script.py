"""bench/gpu_check.sh, the checks for a lent GPU machine, parses, names its steps, fits its 8 minutes and hands
bench/step_cost.py arguments it accepts (no GPU needed)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses_and_names_its_steps():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = SCRIPT.read_text()
    for needle in ("set -euo pipefail", "make setup", "torch.cuda.is_available()", "constraints.txt", "nvidia-smi",
                   "-m pytest -m gpu", "bench/step_cost.py", "timeout", '${1:-${OUT:-./gpu_check_out}}',
                   "--no-index --no-deps", "--target", "DS_ACCELERATOR=cuda"):
        assert needle in text, needle


def test_gpu_test_files_import_neither_ray_nor_mlflow():
    """A lent GPU machine has neither (bench/gpu_wheels.sh does not carry them): gpu_check.sh runs only the files
    that hold gpu tests, and those must not need them, directly or through conftest."""
    files = [p for p in (REPO / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text()]
    assert len(files) >= 3
    for path in [*files, REPO / "tests" / "conftest.py", REPO / "tests" / "tiny.py"]:
        imports = re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.MULTILINE)
        assert not {"ray", "mlflow", "launcher"} & set(imports), path


def test_gpu_check_steps_fit_eight_minutes():
    budgets = dict(re.findall(r"\b(SETUP_S|SMI_S|TESTS_S|BENCH_S)=(\d+)", SCRIPT.read_text()))
    assert len(budgets) == 4 and sum(int(s) for s in budgets.values()) <= 8 * 60, budgets


def test_gpu_check_bench_arguments_are_step_costs(monkeypatch):
    match = re.search(r"^bench_args=\((.*?)\)$", SCRIPT.read_text(), re.MULTILINE | re.DOTALL)
    assert match
    argv = shlex.split(match.group(1))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import step_cost

    args = step_cost.parse_args(argv)
    assert (args.device, args.precision, args.shape) == ("cuda", "bf16", "bert-base")
    names = {v.name for v in step_cost.variants_for(step_cost.shape_of(args), args.precision)}
    only = set(args.only.split(","))
    assert only == {"kd", "metadistil_k1_forward_ad", "metadistil_k4_forward_ad"} and only <= names
