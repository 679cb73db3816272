"""Mid-trial checkpoints: a retried or resumed trial continues from its last evaluation instead of restarting.

A checkpoint holds every trainable engine (weights and optimizer state, through the engines' own
save_checkpoint/load_checkpoint), the best-validation student so far, the step, and the torch RNG state, so the
continuation draws the same dropout masks an uninterrupted run would have. It also records the fingerprint of the
trial config it was written for: a sweep rerun with a changed config reuses the trial ids, and a checkpoint of the old
config must not be continued by the new one.

Checkpoints sit in a sweep's (possibly shared) storage, so every file is read back with a weights-only unpickler
(``trainer.engine.safe_load``): a planted file fails the trial instead of running code in it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from trainer.config import TrialConfig, digest
from trainer.distributed import barrier, is_main, world
from trainer.engine import Engine, load_checkpoint, safe_load

_STATE, _TRAINER, _TAG = "state.json", "trainer.pt", "engine"  # DeepSpeed itself writes a file "latest"


def fingerprint(cfg: TrialConfig) -> str:
    """What a checkpoint must match to be continued: the whole trial config except where it is logged."""
    return digest(cfg.model_dump(mode="json", exclude={"tracking"}), length=16)


def save(folder: Path, step: int, best: dict, engines: dict[str, Engine], config: str) -> None:
    """Write the checkpoint next to the old one, then swap, so a crash mid-write leaves the previous one intact.

    With several workers every worker calls this (DeepSpeed checkpoints are collective); the first one owns the folders.
    """
    staging = folder.with_name(folder.name + ".partial")
    if is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(staging / name), tag=_TAG)
    torch.save(torch.get_rng_state(), staging / _rng_file())
    barrier()
    if is_main():
        torch.save({"best_state": best["state"]}, staging / _TRAINER)
        (staging / _STATE).write_text(json.dumps({"step": step, "best_scores": best["scores"],
                                                  "best_step": best["step"], "config": config}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    barrier()


def load(folder: Path, engines: dict[str, Engine], config: str) -> tuple[int, dict] | None:
    """Restore engines and RNG from ``folder``; return (step, best), or None when there is no checkpoint or it was
    written for another config (``fingerprint``): the trial then starts afresh and its first save replaces it."""
    if not (folder / _STATE).is_file():
        return None
    state = json.loads((folder / _STATE).read_text())
    if state.get("config") != config:
        warnings.warn(f"{folder}: a checkpoint of step {state['step']} written for a different trial config "
                      f"({state.get('config')}, this one is {config}) is not continued; the trial starts afresh",
                      stacklevel=2)
        return None
    for name, engine in engines.items():
        load_checkpoint(engine, str(folder / name), tag=_TAG)
    extra = safe_load(folder / _TRAINER)
    torch.set_rng_state(safe_load(folder / _rng_file()))
    best = {"scores": state["best_scores"], "step": state["best_step"], "state": extra["best_state"]}
    return state["step"], best


def _rng_file() -> str:
    """Each worker draws its own dropout masks, so each keeps its own RNG state."""
    return f"rng_rank{world()[0]}.pt"


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
