"""Wrapping trainable models: DeepSpeed engines, or a plain-torch engine with the same surface.

Both expose ``module``, ``__call__`` (forward), ``backward(loss)`` and ``step()`` (optimizer step, then zero grads).
Gradients computed outside an engine (the meta step works on detached parameter copies) are handed in through
``apply_gradients``, which backpropagates the surrogate loss sum(<p, g>) whose gradient with respect to p is g.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.config import ConfigError, DeepSpeedConfig
from trainer.logging import libraries_quiet


class Engine(Protocol):
    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def get_lr(self) -> list[float]: ...

    def save_checkpoint(self, save_dir: str, tag: str) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str) -> Any: ...


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule over ``steps`` optimizer steps, with the semantics of transformers' schedules."""

    kind: str  # "linear" (rise, then decay to 0) | "constant" (rise, then flat)
    steps: int
    warmup_ratio: float = 0.0

    def __call__(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

        warmup = math.ceil(self.warmup_ratio * self.steps)  # rounded up, as transformers' warmup_ratio is
        if self.kind == "linear":
            return get_linear_schedule_with_warmup(optimizer, warmup, max(self.steps, 1))
        return get_constant_schedule_with_warmup(optimizer, warmup)


CONSTANT = Schedule("constant", 0)


class TorchEngine:
    """Plain torch with a DeepSpeed engine's surface: used when deepspeed.enabled is false."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None,
                 schedule: Schedule = CONSTANT):
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.lr_scheduler = schedule(optimizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    # Same names and folder semantics as DeepSpeedEngine's, so checkpoints need not know which engine they hold.
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict()}, Path(save_dir, tag, "engine.pt"))

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        state = safe_load(Path(load_dir, tag, "engine.pt"))
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects other than tensors and plain data; it is refused, never unpickled."""


def safe_load(path: str | Path, map_location: Any = "cpu", allowed: Sequence[type] = ()) -> Any:
    """``torch.load`` that rebuilds only tensors, plain data and the ``allowed`` types.

    Checkpoints live in a sweep's (shared) storage and are read back on resume and on retries: a planted file must
    fail the trial, not run code in it.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, the very thing refused here: name only the culprit.
        culprit = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        named = f" ({culprit[1]})" if culprit else ""
        raise UnsafeCheckpointError(f"refused to load {path}: it holds objects other than tensors and plain "
                                    f"data{named}, and unpickling those can run code") from None


def load_checkpoint(engine: Engine, load_dir: str, tag: str) -> None:
    """Restore ``engine`` from what its ``save_checkpoint`` wrote, unpickling only tensors and plain data."""
    if isinstance(engine, TorchEngine):
        engine.load_checkpoint(load_dir, tag)
        return
    ds: Any = engine  # a DeepSpeedEngine: its universal flag and checkpoint engine are no part of Engine
    if ds.load_universal_checkpoint():
        raise ConfigError("deepspeed.config_path: checkpoint.load_universal is not supported: DeepSpeed reads "
                          "universal checkpoints with an unrestricted torch.load")
    # DeepSpeed (0.19.8) has no option for how load_checkpoint reads files: it reads every file of a (non-universal)
    # checkpoint through engine.checkpoint_engine.load, whose torch.load has weights_only=False. The safe reader
    # stands in for this one load; saves keep the configured checkpoint engine.
    configured = ds.checkpoint_engine
    ds.checkpoint_engine = _SafeDeepSpeedReader()
    try:
        ds.load_checkpoint(load_dir, tag=tag)
    finally:
        ds.checkpoint_engine = configured


class _SafeDeepSpeedReader:
    """The part of DeepSpeed's CheckpointEngine interface that ``DeepSpeedEngine.load_checkpoint`` uses."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location, _deepspeed_checkpoint_types())


def _deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoints, all in ZeRO's optimizer-state files: the ZeRO
    stage, each parameter fragment's place in the flat buffer, and the loss scaler (static at fp32 and bf16, dynamic at
    fp16). Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 fp32/bf16 checkpoints and
    on the pickled fp16 scaler; tests/unit/test_safe_load.py loads real ones."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def apply_gradients(engine: Engine, grads: Sequence[torch.Tensor]) -> None:
    """Hand precomputed gradients (in ``module.parameters()`` order) to the engine's own backward."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if isinstance(engine, TorchEngine):  # no hooks to feed: accumulate directly, a backward pass cheaper
        for p, g in zip(params, grads, strict=True):
            grad = g.detach().to(p.dtype)
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        return
    surrogate = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads, strict=True))
    assert isinstance(surrogate, torch.Tensor), "sum's start value 0: the engine has no trainable parameters"
    engine.backward(surrogate)


def deepspeed_config(cfg: DeepSpeedConfig, batch_size: int, grad_clip: float | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # the optimizer is torch's AdamW, passed in, not a fused DeepSpeed one
        "wall_clock_breakdown": False,
    }
    if grad_clip is not None:
        config["gradient_clipping"] = grad_clip
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if cfg.precision == "fp16":
        config["fp16"] = {"enabled": True}
    if cfg.config_path:
        _merge(config, _read_user_config(cfg.config_path))
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(config.get(section, {}), dict):
            raise ConfigError(f"deepspeed.config_path: {section} must be a JSON object, got {config[section]!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config_path: zero_optimization.stage must be 0..3, got {stage!r}")
    # The file may add settings but not contradict the trial's own keys: validation (e.g. "no ZeRO-3 with metadistil",
    # "no fp16 on CPU") and the logged trial config only know deepspeed.zero_stage and deepspeed.precision.
    if stage != cfg.zero_stage:
        raise ConfigError(f"deepspeed.config_path: zero_optimization.stage={stage!r} in {cfg.config_path!r} "
                          f"contradicts deepspeed.zero_stage={cfg.zero_stage}; set deepspeed.zero_stage instead")
    for half in ("bf16", "fp16"):
        enabled = bool(config.get(half, {}).get("enabled", False))
        if enabled != (cfg.precision == half):
            raise ConfigError(f"deepspeed.config_path: {half}.enabled={enabled} in {cfg.config_path!r} contradicts "
                              f"deepspeed.precision={cfg.precision!r}; set deepspeed.precision instead")
    return config


def _read_user_config(config_path: str) -> dict[str, Any]:
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_path: {config_path!r} does not exist")
    try:
        user = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed.config_path: {config_path!r} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_path: {config_path!r} must hold a JSON object, got {type(user).__name__}")
    if "scheduler" in user:
        raise ConfigError(f"deepspeed.config_path: {config_path!r} sets a 'scheduler', but the trainer owns the "
                          f"learning-rate schedule: remove it and set optim.schedule / optim.warmup_ratio (and "
                          f"metadistil.teacher_schedule for the teachers)")
    for key in ("optimizer", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        user.pop(key, None)  # the trainer owns batch sizes and the optimizer
    return user


def _merge(base: dict[str, Any], user: dict[str, Any]) -> None:
    """Merge ``user`` into ``base`` key by key, recursing into sections: a file that only sets, e.g.,
    ``zero_optimization.reduce_bucket_size`` must not drop the generated ``zero_optimization.stage`` (a flat
    ``dict.update`` silently turned such a trial into ZeRO 0)."""
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _single_process_group_env() -> None:
    """A single process outside any launcher still needs a (world size 1) process group for DeepSpeed.

    Under a launcher (WORLD_SIZE > 1: Ray Train, torchrun) its variables stand. Otherwise the group gets a fresh port
    of its own: an inherited MASTER_PORT is not ours to use (a Ray worker inherits the environment of the process that
    started Ray, which may hold a group on that very port: EADDRINUSE).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def wrap(module: nn.Module, lr: float, weight_decay: float, cfg: DeepSpeedConfig, batch_size: int,
         grad_clip: float | None, schedule: Schedule = CONSTANT) -> Engine:
    """An AdamW-trained engine for ``module`` whose learning rate follows ``schedule``: DeepSpeed when enabled, else
    plain torch."""
    # fused: one kernel over all parameters; on CPU the default is a Python loop over tensors, ~2.7x slower here.
    optimizer = torch.optim.AdamW(parameter_groups(module, weight_decay), lr=lr, fused=True)
    if not cfg.enabled:
        return TorchEngine(module, optimizer, grad_clip, schedule)
    config = deepspeed_config(cfg, batch_size, grad_clip)  # a bad config_path fails before any process group exists
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    # DeepSpeed's first communication backend of a process prints a bare line on stdout (on CPU: its shared-memory op
    # "built successfully"), once per trial: only its own calls are silenced, not its logger.
    with contextlib.redirect_stdout(io.StringIO()) if libraries_quiet() else contextlib.nullcontext():
        if not torch.distributed.is_initialized():
            _single_process_group_env()
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        elif deepspeed.comm.comm.cdb is None:  # a launcher's group (Ray Train): initialize would build the backend here
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    # A callable: DeepSpeed builds the scheduler on its own optimizer, steps it with the engine and checkpoints it.
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


# Parameter names that are never decayed, besides everything inside a LayerNorm: transformers' Trainer's patterns.
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on biases and normalisation weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = set(get_parameter_names(module, [nn.LayerNorm], _NO_DECAY))
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decayed], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if n not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
