"""bench/step_cost.py --quick runs end to end (tiny shapes, memory children included) and prints its ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_cost.py"


def test_step_cost_quick_runs_and_prints_ratios(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"^ratio metadistil_k1_forward_ad (\S+)", result.stdout, re.MULTILINE)
    assert match, result.stdout[-3000:]
    assert float(match.group(1)) > 0
    memory = re.search(r"^ratio memory_metadistil_k1_forward_ad (\S+)", result.stdout, re.MULTILINE)
    assert memory and float(memory.group(1)) > 0, result.stdout[-3000:]
    assert "| variant | median s/step | ratio to KD | peak MB | memory ratio |" in result.stdout
    assert (tmp_path / "out.json").is_file()
