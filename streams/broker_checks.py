"""Settings the Kafka broker must accept, checked once at worker start.

A broker that refuses a setting answers every retry the same way: an idempotent producer on a
broker without ``InitProducerId`` (tansu, say) gets ``UnknownError`` from each start, and a runner
that retries connection errors would retry it forever. The worker stops at start instead, with a
message naming the setting to change.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka.errors import KafkaError

from schemas.settings import Settings
from streams.kafka_io import make_producer
from streams.retry import Backoff

log = structlog.get_logger(__name__)


class BrokerRefusedSetting(RuntimeError):
    """The broker refuses what a setting asks for; ``change`` is the environment to set instead."""

    def __init__(self, change: str, detail: str) -> None:
        super().__init__(f"the broker refuses {detail}; set {change} (or use a broker that supports it)")
        self.change = change


async def check_broker_accepts_settings(settings: Settings) -> None:
    """Return once the broker answered and accepts the settings; ``BrokerRefusedSetting`` if it refuses
    one. Waits (with backoff) while the broker is unreachable, as the runners do."""
    if not (settings.producer_idempotence or settings.processing_guarantee == "exactly_once"):
        return
    backoff = Backoff()
    while (error := await _start_error(settings, idempotent=True)) is not None and error.retriable:
        log.warning("broker.check_waiting", error=f"{type(error).__name__}: {error}")
        await asyncio.sleep(backoff.next_delay())
    if error is None:
        return
    plain_error = await _start_error(settings, idempotent=False)
    if plain_error is not None:  # not this setting: the runner reports (and retries) what it is
        log.warning("broker.check_inconclusive", error=f"{type(plain_error).__name__}: {plain_error}")
        return
    if settings.producer_idempotence:
        change, what = "QUSTREAM_PRODUCER_IDEMPOTENCE=false", "idempotent producers"
    else:
        change, what = "QUSTREAM_PROCESSING_GUARANTEE=at_least_once", "transactions (exactly-once processing)"
    refused = BrokerRefusedSetting(change, f"{what}: InitProducerId answered {type(error).__name__}: {error}")
    log.error("broker.setting_refused", change=change, error=str(refused))
    raise refused


async def _start_error(settings: Settings, *, idempotent: bool) -> KafkaError | None:
    producer = make_producer(settings, enable_idempotence=idempotent)
    try:
        await producer.start()
    except KafkaError as exc:
        return exc
    finally:
        await producer.stop()
    return None
