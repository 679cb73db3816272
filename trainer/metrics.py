"""The GLUE metrics of predictions against labels, and wall time and peak memory per training phase."""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch


def score(metrics: Sequence[str], predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Each of ``metrics`` (names in METRICS) of predicted classes (or scores) against the labels; nan when empty."""
    p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    return {name: float(METRICS[name](p, y)) if len(y) else math.nan for name in metrics}


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((p == y).mean())


def f1(p: np.ndarray, y: np.ndarray) -> float:
    """F1 of class 1 (MRPC's paraphrases, QQP's duplicates); 0 when there is no positive prediction or label."""
    tp = float(((p == 1) & (y == 1)).sum())
    wrong = float((p != y).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def mcc(p: np.ndarray, y: np.ndarray) -> float:
    """Matthews correlation over any number of classes (Gorodkin's R_K); 0 when either side holds one class only,
    as scikit-learn defines it (a classifier that always answers the same is no better than chance)."""
    classes = np.union1d(p, y)
    confusion = (y[:, None] == classes)[:, :, None] & (p[:, None] == classes)[:, None, :]
    c = confusion.sum(axis=0).astype(float)
    true, predicted, n = c.sum(axis=1), c.sum(axis=0), c.sum()
    covariance = np.trace(c) * n - true @ predicted
    scale = math.sqrt((n * n - true @ true) * (n * n - predicted @ predicted))
    return covariance / scale if scale else 0.0


def pearson(p: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (undefined there: a constant prediction is no better
    than chance, and a nan would never be kept as the best checkpoint)."""
    dp, dy = p - p.mean(), y - y.mean()
    scale = math.sqrt(float(dp @ dp) * float(dy @ dy))
    return float(dp @ dy) / scale if scale else 0.0


def spearman(p: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson's of the ranks, ties sharing their mean rank."""
    return pearson(_ranks(p), _ranks(y))


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # the rank (from 0) of each distinct value's first copy
    return (first + (counts - 1) / 2)[inverse]


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


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
