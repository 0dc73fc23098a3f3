"""Freed memory goes back to the OS (``workers.memory``): the trim releases free heap pages that glibc
would otherwise keep, and it runs at most once per interval, however often the decoding loop asks."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from workers.memory import (
    ONEDNN_CACHE_CAPACITY,
    ONEDNN_CACHE_VARIABLE,
    HeapTrimmer,
    bound_onednn_primitive_cache,
    return_freed_tensors_to_the_os,
    trim_freed_heap,
)


def test_trimmer_trims_at_most_once_per_interval() -> None:
    now = [100.0]
    trims: list[float] = []
    trimmer = HeapTrimmer(min_interval_s=1.0, trim=lambda: trims.append(now[0]), clock=lambda: now[0])
    asked = []
    for at in (100.0, 100.4, 100.99, 101.0, 101.5, 103.0):
        now[0] = at
        asked.append(trimmer.maybe_trim())
    assert asked == [True, False, False, True, False, True]
    assert trims == [100.0, 101.0, 103.0]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_trim_gives_back_freed_heap_pages_that_a_block_in_use_above_them_pins() -> None:
    return_freed_tensors_to_the_os()  # 256 KiB blocks then come from the heap, as a step's tensors do
    size, count = 256 * 1024, 400
    process = psutil.Process()
    blocks = [bytearray(b"x" * size) for _ in range(count)]
    pin = bytearray(b"y" * size)  # allocated last: the heap cannot shrink from its top past it
    del blocks
    before = process.memory_info().rss
    trim_freed_heap()
    after = process.memory_info().rss
    assert pin[0] == ord("y")
    assert before - after > size * count // 2, f"RSS {before >> 20} MiB -> {after >> 20} MiB"


def test_onednn_primitive_cache_is_bounded_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE, raising=False)
    bound_onednn_primitive_cache()
    assert os.environ[ONEDNN_CACHE_VARIABLE] == str(ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "512")
    bound_onednn_primitive_cache()
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "512"
