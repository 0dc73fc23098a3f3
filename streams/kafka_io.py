"""aiokafka clients built from settings, and the one conversion of an aiokafka record into an
``InboundMessage``; shared by the batch runner, the producer tools and the HTTP bridge."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from schemas.settings import Settings
from workers.core_step import InboundMessage


def inbound_from_kafka(record: ConsumerRecord[bytes, bytes]) -> InboundMessage:
    """A fetched record as the core step takes it (headers without a value are dropped)."""
    headers = record.headers
    return InboundMessage(
        record.value,
        record.key,
        record.topic,
        record.partition,
        str(record.offset),
        record.timestamp,
        {name: value for name, value in headers if value is not None} if headers else {},
    )


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        **settings.kafka_client_options(),
        "acks": "all",
        "enable_idempotence": settings.producer_idempotence,
        "linger_ms": 5,
        "max_request_size": max(1_048_576, settings.max_message_bytes * 2),
        "request_timeout_ms": 30_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: Settings, *topics: str, group_id: str | None = None, **overrides: Any) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        **settings.kafka_client_options(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": 8 * 1_048_576,
        "fetch_max_wait_ms": settings.broker_fetch_max_wait_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def assign_all(consumer: AIOKafkaConsumer, topics: list[str], *, from_end: bool) -> list[TopicPartition]:
    """Assign every partition of ``topics`` to a group-less consumer, at the beginning or the end."""
    await consumer.topics()  # refreshes metadata so partitions_for_topic answers
    partitions = [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    consumer.assign(partitions)
    if from_end:
        await consumer.seek_to_end(*partitions)
    else:
        await consumer.seek_to_beginning(*partitions)
    for tp in partitions:
        await consumer.position(tp)  # resolve now, so nothing sent after this call is missed
    return partitions


async def close_consumer(consumer: AIOKafkaConsumer, timeout_s: float | None = None) -> str | None:
    """Stop ``consumer`` in whatever state a broker outage or a rebalance left it; None once it closed, else
    why it did not, and the caller goes on.

    Why a task of its own: with fetches pending (a broker that went away), aiokafka's ``stop`` cancels
    them and then awaits them, so it raises their CancelledError (aio-libs/aiokafka#647), which must end
    that task, not the caller's; a cancellation of the caller still reaches it. ``timeout_s`` bounds a
    ``stop`` that waits for a group join's answer (Apache Kafka gives it once every member rejoined) or
    for a coordinator that does not answer."""
    closing = asyncio.ensure_future(consumer.stop())
    done, _ = await asyncio.wait((closing,), timeout=timeout_s)
    if not done:
        closing.cancel()
        return f"not closed within {timeout_s} s"
    if closing.cancelled():
        return "cancelled inside aiokafka (fetches pending on an unreachable broker)"
    error = closing.exception()
    return None if error is None else f"{type(error).__name__}: {error}"
