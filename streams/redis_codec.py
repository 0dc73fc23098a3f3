"""How a Kafka-style record (key, value, headers, timestamp) is stored in a Redis Streams entry.

Entry fields: ``v`` = value bytes, ``k`` = key bytes (absent when None), ``ts`` = event time in
epoch milliseconds (absent when unknown), and one ``h:<name>`` field per header. The worker's Redis
transport, the query client and the producer tools all use these functions, so the formats cannot
drift; ``inbound_from_entry`` is the one conversion of an entry into an ``InboundMessage``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from workers.core_step import InboundMessage

VALUE_FIELD = b"v"
KEY_FIELD = b"k"
TIMESTAMP_FIELD = b"ts"
HEADER_PREFIX = b"h:"
#: Redis Streams have no partitions; a stream is reported as partition 0 everywhere.
PARTITION = 0


def encode_entry(
    value: bytes | None, key: bytes | None = None, headers: Iterable[tuple[str, bytes]] = (),
    timestamp_ms: int | None = None,
) -> dict[bytes, bytes]:
    """An entry's fields; a value of None (the dead letter of an entry without one) has no value field."""
    fields: dict[bytes, bytes] = {} if value is None else {VALUE_FIELD: value}
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


def entry_text(raw: bytes | str) -> str:
    """Entry ids and stream names as text, whether or not the client decodes replies."""
    return raw.decode() if isinstance(raw, bytes) else raw


def entry_ms(entry_id: str) -> int | None:
    """When Redis appended the entry (the milliseconds part of its id)."""
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return None


def inbound_from_entry(stream: str, entry_id: str, fields: Mapping[bytes, bytes]) -> InboundMessage:
    """An entry as the core step takes it: partition 0, the entry id as offset."""
    value, key, headers, timestamp_ms = decode_entry(fields)
    # Like a Kafka broker timestamp: without an explicit event time, the entry id's milliseconds
    # (when Redis appended it) stand in for it.
    if timestamp_ms is None:
        timestamp_ms = entry_ms(entry_id)
    return InboundMessage(value, key, stream, PARTITION, entry_id, timestamp_ms, headers)
