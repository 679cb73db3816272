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

    Phases may nest (``teacher_update`` holds ``teacher_update/student_jvp``): an inner phase counts towards the outer
    one's time and peak memory too. On CPU there is no per-phase allocator peak, so ``summary`` reports the process's
    peak resident memory instead.
    """

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak_mb: dict[str, float] = defaultdict(float)
        self._open: list[str] = []

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
            self._fold_peak()  # the allocator has one peak counter: open phases keep theirs before it is reset
            torch.cuda.reset_peak_memory_stats()
        self._open.append(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self._fold_peak()
            self._open.pop()
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1

    def _fold_peak(self) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**20
        for phase in self._open:
            self.peak_mb[phase] = max(self.peak_mb[phase], peak)

    def summary(self) -> dict[str, float]:
        out = {f"time_{phase}_s": self.seconds[phase] / self.calls[phase] for phase in self.seconds}
        if self.cuda:
            out.update({f"peak_memory_{phase}_mb": mb for phase, mb in self.peak_mb.items()})
        else:
            out["peak_memory_process_mb"] = process_peak_mb()
        return out
