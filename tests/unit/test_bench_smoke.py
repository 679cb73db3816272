"""bench/step_cost.py --quick runs end to end (tiny shapes, memory children included) and prints its ratios and the
MetaDistil step's phases from the trial's own timer; in bf16 it runs DeepSpeed engines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_cost.py"


def run_quick(*flags: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", *flags], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def ratio(stdout: str, name: str) -> float:
    match = re.search(rf"^ratio {name} (\S+)", stdout, re.MULTILINE)
    assert match, stdout[-3000:]
    return float(match.group(1))


def test_step_cost_quick_runs_and_prints_ratios(tmp_path):
    stdout = run_quick("--json", str(tmp_path / "out.json"))
    assert ratio(stdout, "metadistil_k1_forward_ad") > 0
    assert ratio(stdout, "memory_metadistil_k1_forward_ad") > 0
    phases = stdout.split("== phases of metadistil_k1_forward_ad ", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^  teacher_update +\d+\.\d+ s", phases, re.MULTILINE), phases
    assert "| variant | median s/step | ratio to KD | peak MB | memory ratio |" in stdout
    assert (tmp_path / "out.json").is_file()


def test_step_cost_quick_bf16_runs_deepspeed_engines():
    stdout = run_quick("--precision", "bf16")
    assert ratio(stdout, "metadistil_k1_forward_ad") > 0
    assert "DeepSpeed bf16 engines (ZeRO 0)" in stdout
    assert "finite_difference" not in stdout  # refused in bf16 by the trial config
