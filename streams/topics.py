"""Topic creation up front, with the configured partitions (Faust creates only its internal ones)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.settings import Settings

log = structlog.get_logger(__name__)


def topic_names(settings: Settings) -> list[str]:
    return [settings.topic_input, settings.topic_parsed, settings.topic_metrics, settings.topic_dlq]


async def ensure_topics_with_retry(settings: Settings, max_delay_s: float = 30.0) -> list[str]:
    """``ensure_topics`` until the broker answers: a worker started before its broker waits, it does not exit."""
    attempt = 0
    while True:
        try:
            return await ensure_topics(settings)
        except Exception as exc:
            attempt += 1
            delay = min(max_delay_s, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("topics.broker_unreachable", attempt=attempt, retry_in_s=round(delay, 1),
                        error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(delay)


async def ensure_topics(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Create missing topics; returns those created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options(), request_timeout_ms=15_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [name for name in (names or topic_names(settings)) if name not in existing]
        if not wanted:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
            await admin.create_topics(
                [NewTopic(name, settings.partitions, settings.replication_factor) for name in wanted]
            )
        log.info("topics.created", topics=wanted, partitions=settings.partitions)
        return wanted
    finally:
        await admin.close()
