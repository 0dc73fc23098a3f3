"""Handing freed memory back to the operating system (glibc on Linux; elsewhere these do nothing), and
bounding what oneDNN keeps for bf16 matmuls.

Decoding allocates and frees tensors of many sizes at every step. glibc keeps freed blocks for reuse,
so without help a worker's RSS stays at its largest step for good, and a continuous decoding loop,
whose steps are all of middling size, keeps a fragmented heap of them (docs/performance.md, "The
continuous runner's burst gap")."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from collections.abc import Callable

#: glibc's ``mallopt`` parameter for the size from which allocations are mmapped.
_M_MMAP_THRESHOLD = -3
#: oneDNN's own variable, and the bound qustream gives it unless the operator set one.
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 32


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def return_freed_tensors_to_the_os() -> None:
    """glibc's mmap threshold grows with every large block freed: the key/value tensors each decoding
    step allocates and frees then stay in the heap, and the worker's RSS ratchets up to its largest
    step. A fixed threshold of 1 MiB mmaps such tensors, so freeing them gives the memory back."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def bound_onednn_primitive_cache() -> None:
    """bf16 matmuls on a CPU go through oneDNN, which keeps a compiled primitive, with its own buffers,
    for every matmul shape it has seen, up to 1,024 of them. Decoding meets a new shape with nearly
    every batch size and step width, so a bf16 worker's memory grew by hundreds of MiB that way; a few
    dozen primitives hold the shapes in use (docs/engine.md, "bf16 on a CPU"). oneDNN reads the variable
    when it first builds one, so this works until the first bf16 matmul; an operator's value wins."""
    os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_CAPACITY))


def trim_freed_heap() -> None:
    """Give the heap's free pages back (``malloc_trim(0)``), also those between blocks in use."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrimmer:
    """Calls ``trim`` at most once per ``min_interval_s``: a trim costs a few milliseconds, nothing
    beside a CPU decoding step, but more than a GPU's whole step."""

    def __init__(self, min_interval_s: float = 1.0, trim: Callable[[], None] = trim_freed_heap,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._trim = trim
        self._clock = clock
        self._last: float | None = None

    def maybe_trim(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.min_interval_s:
            return False
        self._trim()
        self._last = self._clock()
        return True
