"""The trainer package runs inside Ray workers and tests alike: it must not import ray or mlflow at module level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_trainer_modules_import_neither_ray_nor_mlflow():
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "trainer").rglob("*.py"))
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) >= 10
    assert done.stdout.strip() == "[]"
