"""trainer/allocator.py: large CPU tensors reuse freed memory (counted in page faults), and a user's choice stands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.allocator import keep_large_blocks_on_heap, on_glibc

ROOT = Path(__file__).resolve().parents[2]
BLOCK_PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # one 64 MiB tensor
# 64 MiB tensors, each freed before the next: 20 while the heap settles, then 10 whose page faults are printed.
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "on":
    from trainer.allocator import keep_large_blocks_on_heap, on_glibc
    print(keep_large_blocks_on_heap())
for _ in range(20):
    torch.zeros(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.zeros(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(not on_glibc(), reason="mallopt is glibc's")


def page_faults(mode: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@glibc_only
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    default = int(page_faults("off")[-1])
    applied, kept = page_faults("on")
    assert applied == "True"
    assert default >= 9 * BLOCK_PAGES  # glibc's default: every 64 MiB tensor is a fresh mapping
    assert int(kept) < BLOCK_PAGES // 4, (default, kept)


@glibc_only
@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "131072"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                                         ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_an_allocator_setting_of_the_users_is_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert keep_large_blocks_on_heap() is False
