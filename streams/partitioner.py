"""Kafka's default partitioner (murmur2 of the key, as the Java client and aiokafka place keyed
records), computed for a whole batch of keys at once.

aiokafka's ``murmur2`` is a pure-Python loop per key; this is the same arithmetic on numpy arrays,
one column of 4-byte words at a time over all keys of one length. Kept because ``qustream bench
handwritten`` shows it cheaper per published record by a share of the cached path that matters
(figures in ``docs/performance-handwritten.md``); ``tests/test_partitioner.py`` holds it equal to
aiokafka's ``DefaultPartitioner``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

_SEED = 0x9747B28C
_M = np.uint32(0x5BD1E995)


def murmur2_many(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of each key, as unsigned 32-bit integers."""
    hashes = np.empty(len(keys), dtype=np.uint32)
    positions_by_length: dict[int, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        positions_by_length[len(key)].append(position)
    with np.errstate(over="ignore"):  # multiplication modulo 2**32 is the algorithm
        for length, positions in positions_by_length.items():
            data = np.frombuffer(b"".join([keys[p] for p in positions]), dtype=np.uint8).reshape(
                len(positions), length
            )
            h = np.full(len(positions), (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
            whole = length & ~3
            if whole:
                words = np.ascontiguousarray(data[:, :whole]).view("<u4")
                for column in range(whole // 4):
                    k = words[:, column] * _M
                    k ^= k >> np.uint32(24)
                    k *= _M
                    h *= _M
                    h ^= k
            tail = length & 3
            if tail:
                if tail == 3:
                    h ^= data[:, whole + 2].astype(np.uint32) << np.uint32(16)
                if tail >= 2:
                    h ^= data[:, whole + 1].astype(np.uint32) << np.uint32(8)
                h ^= data[:, whole].astype(np.uint32)
                h *= _M
            h ^= h >> np.uint32(13)
            h *= _M
            h ^= h >> np.uint32(15)
            hashes[positions] = h
    return hashes


def partitions_for_keys(keys: Sequence[bytes | None], partitions: Sequence[int]) -> list[int]:
    """The partition ``DefaultPartitioner`` gives each key (``partitions`` sorted by id); a record
    without a key goes to a random partition, as it does there."""
    placed = [0] * len(keys)
    keyed: list[int] = []
    for position, key in enumerate(keys):
        if key is None:
            placed[position] = random.choice(partitions)
        else:
            keyed.append(position)
    if keyed:
        hashes = murmur2_many([keys[position] for position in keyed])  # type: ignore[misc]
        indices = ((hashes & np.uint32(0x7FFFFFFF)) % np.uint32(len(partitions))).tolist()
        for position, index in zip(keyed, indices, strict=True):
            placed[position] = partitions[index]
    return placed
