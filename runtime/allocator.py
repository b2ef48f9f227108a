"""Keep freed activation-sized blocks in the process instead of handing them back.

A training step allocates and frees the same activation and gradient tensors
every time.  glibc's malloc serves blocks over 128 KiB with mmap and returns them
with munmap, so a process that has not yet freed big blocks pays fresh,
zero-filled pages on every step.  A `convspec train` run escapes this by luck:
loading the dataset frees big arrays, which raises glibc's adaptive thresholds.
A fresh `convspec bench` process did not, and on cifar10-80sec in bf16 at batch 128
(2-core AMD EPYC) it timed the step at 40.3 ms where the same process with the
thresholds raised took 28.4 ms and training's loop ran at about 30 ms: its forward
and backward times were inflated alike, by page faults, not by the layers.

Setting the two thresholds once, at start-up, gives every command the state
training had by accident.  It changes where memory comes from, never a number
computed; a standalone loop of that step peaked at 364 MiB with it and 361 MiB
without.  It is glibc only (Linux); elsewhere, or where the user set any
MALLOC_* variable of their own, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap, so they are reused; larger tensors are still
# mmapped.  mallopt(3) gives 32 MiB as the 64-bit maximum, which the second value meets
# where a glibc refuses more (2.36, here, accepts 64 MiB).
MMAP_THRESHOLDS = (64 << 20, 32 << 20)
# Free memory at the heap's top is kept up to this much before being returned.
TRIM_THRESHOLD = 256 << 20


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds; True if they were set."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: no glibc mallopt to call
        return False
    if not any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLDS):
        return False
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
