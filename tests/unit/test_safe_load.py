"""Checkpoints are read back without running code: only tensors, plain data and DeepSpeed's own few types unpickle.

A trial's checkpoint sits in a sweep's storage and is loaded on ``--resume`` and on Ray retries. DeepSpeed's own reader
unpickles anything (``torch.load(weights_only=False)``), so a planted file could run code; the trainer reads every
file with a weights-only unpickler instead. Real checkpoints of tiny DeepSpeed engines (ZeRO 0 and 1, fp32 and bf16)
and of the plain-torch engine must still restore exactly; a file carrying a payload is refused, naming the file, and
the payload does not run.
"""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import checkpoint
from trainer.config import ConfigError, DeepSpeedConfig
from trainer.engine import TorchEngine, UnsafeCheckpointError, wrap

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: E402  # only once deepspeed is there

CONFIG = "fingerprint"
ENGINES = [
    pytest.param({"enabled": False}, id="torch"),
    pytest.param({"enabled": True, "zero_stage": 0}, id="zero0-fp32"),
    pytest.param({"enabled": True, "zero_stage": 1}, id="zero1-fp32"),
    pytest.param({"enabled": True, "zero_stage": 0, "precision": "bf16"}, id="zero0-bf16"),
    pytest.param({"enabled": True, "zero_stage": 1, "precision": "bf16"}, id="zero1-bf16"),
]


class TouchOnUnpickle:
    """A payload: unpickling it with an unrestricted loader creates ``marker`` (code from the file runs)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def engine(ds: dict, seed: int, **ds_extra):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    return wrap(module, lr=1e-2, weight_decay=0.01, cfg=DeepSpeedConfig(**ds, **ds_extra), batch_size=4,
                grad_clip=1.0)


def trained(ds: dict, seed: int = 0, steps: int = 2):
    """An engine with optimizer state worth restoring (AdamW moments, step counts)."""
    e = engine(ds, seed)
    for _ in range(steps):
        x = torch.randn(4, 6, dtype=next(e.module.parameters()).dtype)
        e.backward(e(x).float().pow(2).mean())
        e.step()
    return e


def save(folder: Path, e) -> None:
    best = {"state": {k: v.clone() for k, v in e.module.state_dict().items()}, "scores": {"accuracy": 0.5}, "step": 2}
    checkpoint.save(folder, step=2, best=best, engines={"student": e}, config=CONFIG)


def assert_same(a, b, where: str = "state") -> None:
    """Equal structure, equal tensors (bitwise), equal plain values; objects (DeepSpeed's loss scaler) by attribute."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # no value equality: DeepSpeed's loss scaler
        assert_same(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("ds", ENGINES)
def test_a_real_checkpoint_restores_exactly(tmp_path, ds):
    saved = trained(ds, seed=0)
    save(tmp_path / "ckpt", saved)
    restored = engine(ds, seed=1)  # other initial weights, no optimizer state yet
    assert not torch.equal(next(saved.module.parameters()), next(restored.module.parameters()))

    step, best = checkpoint.load(tmp_path / "ckpt", {"student": restored}, CONFIG)

    assert step == 2 and best["scores"] == {"accuracy": 0.5}
    assert_same(saved.module.state_dict(), restored.module.state_dict(), "module")
    assert_same(saved.optimizer.state_dict(), restored.optimizer.state_dict(), "optimizer")
    assert_same(dict(saved.module.state_dict()), best["state"], "best_state")
    if not isinstance(saved, TorchEngine):
        assert restored.global_steps == saved.global_steps == 2
        assert type(restored.checkpoint_engine) is type(saved.checkpoint_engine), "saving keeps DeepSpeed's engine"


# Each file a resumed trial reads: DeepSpeed's model states (ZeRO 0: also the optimizer state) and ZeRO's partitioned
# optimizer state, the plain-torch engine's file, and the trainer's own.
PLANTED = [
    pytest.param({"enabled": True, "zero_stage": 0}, "student/engine/mp_rank_00_model_states.pt", id="ds-model-states"),
    pytest.param({"enabled": True, "zero_stage": 1}, "student/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 id="ds-zero-optim-states"),
    pytest.param({"enabled": False}, "student/engine/engine.pt", id="torch-engine"),
    pytest.param({"enabled": False}, "trainer.pt", id="trainer"),
]


@pytest.mark.parametrize("ds, file", PLANTED)
def test_a_planted_payload_is_refused_and_does_not_run(tmp_path, ds, file):
    save(tmp_path / "ckpt", trained(ds))
    planted, marker = tmp_path / "ckpt" / file, tmp_path / "payload-ran"
    assert planted.is_file(), sorted(p.name for p in planted.parent.iterdir())
    state = torch.load(planted, weights_only=False)  # the file just written, not yet tampered with
    torch.save({**state, "extra": TouchOnUnpickle(marker)}, planted)  # a valid checkpoint, plus the payload

    with pytest.raises(UnsafeCheckpointError) as refused:
        checkpoint.load(tmp_path / "ckpt", {"student": engine(ds, seed=1)}, CONFIG)

    message = str(refused.value)
    assert str(planted) in message and "objects other than tensors and plain data" in message
    assert "\n" not in message, "one line: the sweep prints the first line of a trial's error"
    assert not marker.exists(), "the payload ran"
    TorchCheckpointEngine().load(str(planted))  # DeepSpeed's own reader: the payload is live
    assert marker.exists()


def test_universal_checkpoints_are_refused(tmp_path):
    """DeepSpeed reads universal checkpoints with its own unrestricted torch.load, past any checkpoint engine."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    ds = {"enabled": True, "zero_stage": 1}
    save(tmp_path / "ckpt", trained(ds))
    with pytest.raises(ConfigError, match="load_universal"):
        checkpoint.load(tmp_path / "ckpt", {"student": engine(ds, seed=1, config_path=str(user))}, CONFIG)


def test_the_fp16_loss_scaler_unpickles(tmp_path):
    """fp16 (GPU only) is the one precision whose ZeRO files pickle a DynamicLossScaler; here it is pickled alone."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from trainer.engine import _SafeDeepSpeedReader

    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    assert_same({"loss_scaler": scaler}, _SafeDeepSpeedReader().load(str(tmp_path / "optim_states.pt")))
