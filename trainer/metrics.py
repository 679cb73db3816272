"""Wall time and peak memory per training phase."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def process_peak_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseTimer:
    """Accumulates seconds per named phase; on CUDA also the peak allocated memory inside each phase.

    On CPU there is no per-phase allocator peak, so ``summary`` reports the process's peak resident memory instead.
    """

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak_mb: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self.peak_mb[phase] = max(self.peak_mb[phase], torch.cuda.max_memory_allocated() / 2**20)
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1

    def summary(self) -> dict[str, float]:
        out = {f"time_{phase}_s": self.seconds[phase] / self.calls[phase] for phase in self.seconds}
        if self.cuda:
            out.update({f"peak_memory_{phase}_mb": mb for phase, mb in self.peak_mb.items()})
        else:
            out["peak_memory_process_mb"] = process_peak_mb()
        return out
