"""The batch partitioner places keys exactly where aiokafka's ``DefaultPartitioner`` does."""

from __future__ import annotations

import random
import uuid

from aiokafka.partitioner import DefaultPartitioner, murmur2

from streams.partitioner import murmur2_many, partitions_for_keys


def test_murmur2_many_equals_the_java_compatible_hash_for_every_key_length() -> None:
    rng = random.Random(7)
    keys = [rng.randbytes(length) for length in range(0, 70) for _ in range(15)]
    keys += [str(uuid.UUID(int=rng.getrandbits(128))).encode() for _ in range(200)]
    rng.shuffle(keys)  # lengths interleaved: results must come back in the keys' order
    assert murmur2_many(keys).tolist() == [murmur2(key) & 0xFFFFFFFF for key in keys]


def test_partitions_for_keys_matches_the_default_partitioner() -> None:
    rng = random.Random(11)
    partitioner = DefaultPartitioner()
    for partitions in ([0], [0, 1, 2], list(range(12))):
        keys: list[bytes | None] = [f"query-{rng.getrandbits(40)}".encode() for _ in range(500)]
        keys[3] = keys[99] = None
        placed = partitions_for_keys(keys, partitions)
        for key, partition in zip(keys, placed, strict=True):
            if key is None:
                assert partition in partitions
            else:
                assert partition == partitioner(key, partitions, partitions), key
