"""CPU memory: large tensors reuse freed heap memory instead of fresh pages from the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB, however it adapts) with a fresh ``mmap``
and returns it to the kernel on free, so each such tensor page-faults all its pages again, zero-filled by the kernel.
A BERT-vocabulary embedding's gradient (30,522 x 384 floats, 47 MB) is such a block, allocated anew in every
backward, and MetaDistil's step allocates several more of them (the pilot's θ', θ + hv, the teachers' gradients).
Measured (BENCHMARKS.md, "The CPU allocator"): a fresh 47 MB ``torch.zeros`` 19-22 ms against 1.7 ms once freed memory
is reused; at MiniLM shape on 2 threads the lagged MetaDistil step 2.58-2.59x a KD step against 2.46-2.48x (paired).

PyTorch's CPU tuning guide recommends jemalloc or tcmalloc (``LD_PRELOAD``) for the same reason; this needs neither.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the heap's free top is kept, not handed back after every large free
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def on_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_large_blocks_on_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were set.

    Left alone: other C libraries (no ``mallopt``), and processes whose user chose the allocator's behaviour
    (glibc's ``MALLOC_*_THRESHOLD_`` variables, or a ``*malloc`` library in ``LD_PRELOAD``).
    """
    if not on_glibc():
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # jemalloc, tcmalloc, mimalloc
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(param, value) == 1 for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
