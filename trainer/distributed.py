"""Data parallelism across workers (a Ray Train trial with several workers), as seen by the trainer.

A multi-worker trial keeps the single-worker trial's meaning: ``optim.batch_size`` and ``metadistil.quiz_batch_size``
are global, each worker takes an equal slice of every batch, and every gradient is the average over the slices, which
is the gradient of the whole batch. The DeepSpeed engines average the gradients they are given; the meta step averages
its own intermediate ones (the pilot gradient and the quiz gradient) with ``average``. One worker (or no process
group) makes every function here a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer import registry
from trainer.config import ConfigError, TrialConfig


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """The worker that logs, evaluates for the record and writes outputs."""
    return world()[0] == 0


def shard(indices: np.ndarray) -> np.ndarray:
    """This worker's slice of a global batch of example indices."""
    rank, size = world()
    return indices[rank::size]


def average(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors in place across workers."""
    _, size = world()
    if size == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(size)


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def check_workers(cfg: TrialConfig, workers: int) -> None:
    """What ``workers`` data-parallel workers need of a trial config: checked by a sweep's
    ``--dry-run`` before anything runs, and by the trainer at the start of a trial."""
    if workers == 1:
        return
    problems = []
    if not cfg.deepspeed.enabled:
        problems.append("deepspeed.enabled must be true (DeepSpeed averages the workers' gradients)")
    if cfg.optim.batch_size % workers:
        problems.append(f"optim.batch_size={cfg.optim.batch_size} must split evenly over {workers} workers")
    problems += registry.get(cfg.algorithm).worker_problems(cfg, workers)
    if problems:
        raise ConfigError(f"with workers={workers}: {'; '.join(problems)}")
