"""The batch partitioner places keys exactly where aiokafka's ``DefaultPartitioner`` does."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

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


def test_real_query_keys_land_where_the_default_partitioner_puts_them() -> None:
    """Keys as the worker writes them: producers' ids, ids derived from topic-partition-offset, UUIDs,
    and real shopping queries (some producers key by the query text), non-ASCII included."""
    data = Path(__file__).parent / "data"
    queries = [json.loads(line)["query"] for name in ("quality_furniture.jsonl", "singular_pairs.jsonl")
               for line in (data / name).read_text().splitlines()]
    queries += ["canapé d'angle gris", "ソファ ベッド", "sofá cama 😀"]
    keys = [query.encode() for query in queries]
    keys += [f"load-1764650000-{index}".encode() for index in range(0, 5000, 7)]
    keys += [f"queries-{partition}-{offset}".encode() for partition in range(12) for offset in (0, 9, 123456789)]
    keys += [str(uuid.uuid4()).encode() for _ in range(100)]
    partitioner = DefaultPartitioner()
    for partitions in ([0, 1, 2], list(range(12)), list(range(64))):
        expected = [partitioner(key, partitions, partitions) for key in keys]
        assert partitions_for_keys(list(keys), partitions) == expected
