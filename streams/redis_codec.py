"""How a Kafka-style record (key, value, headers, timestamp) is stored in a Redis Streams entry.

Entry fields: ``v`` = value bytes, ``k`` = key bytes (absent when None), ``ts`` = event time in
epoch milliseconds (absent when unknown), and one ``h:<name>`` field per header. Both the worker's
Redis transport and the producer tools use these two functions, so the formats cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

VALUE_FIELD = b"v"
KEY_FIELD = b"k"
TIMESTAMP_FIELD = b"ts"
HEADER_PREFIX = b"h:"


def encode_entry(
    value: bytes, key: bytes | None = None, headers: Iterable[tuple[str, bytes]] = (), timestamp_ms: int | None = None
) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {VALUE_FIELD: value}
    if key is not None:
        fields[KEY_FIELD] = key
    if timestamp_ms is not None:
        fields[TIMESTAMP_FIELD] = str(timestamp_ms).encode()
    for name, raw in headers:
        fields[HEADER_PREFIX + name.encode()] = raw
    return fields


def decode_entry(
    fields: Mapping[bytes, bytes],
) -> tuple[bytes | None, bytes | None, dict[str, bytes], int | None]:
    """(value, key, headers, timestamp_ms) of an entry; value is None when the field is missing."""
    headers = {
        name[len(HEADER_PREFIX):].decode("utf-8", "replace"): raw
        for name, raw in fields.items()
        if name.startswith(HEADER_PREFIX)
    }
    raw_ts = fields.get(TIMESTAMP_FIELD)
    try:
        timestamp_ms = int(raw_ts) if raw_ts is not None else None
    except ValueError:
        timestamp_ms = None
    return fields.get(VALUE_FIELD), fields.get(KEY_FIELD), headers, timestamp_ms
