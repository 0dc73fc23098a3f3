"""The transport reference: a plain aiokafka consume → produce pass-through, nothing else.

It runs in its own process, like the worker, with the same delivery contract (consumer group,
acks=all, offsets committed only after the outputs are acknowledged), so the gap between it and
the worker on the same messages is what qustream itself costs.

With ``--core-step`` each fetched batch also goes through qustream's core step
(``ParsePipeline.process``: decode, Redis lookup, parsed events) with the worker's settings from the
``QUSTREAM_*`` environment, and the step's outputs are published instead of the input. That is the
worker minus Faust: the gap to the plain pass-through is the core step, the gap to the worker is the
framework. Its engine refuses to run, so it only makes sense on all-cached traffic.

    python -m bench.passthrough --bootstrap 127.0.0.1:9092 --source in --sink out --group g
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


class _NoEngine:
    """Stands in for the model on all-cached traffic; a miss is a benchmark setup error."""

    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    grounding = "catalog"

    def __init__(self, version: str) -> None:
        self.version = version

    def parse_batch(self, queries: list[str]) -> list[Any]:
        raise RuntimeError(f"--core-step got {len(queries)} uncached queries; pre-warm the cache")

    def warm_up(self) -> None:
        pass


def _core_step() -> Any:
    from schemas.settings import Settings
    from schemas.vocabulary import Vocabulary
    from workers.cache import ParseCache, redis_client
    from workers.engine import engine_version
    from workers.pipeline import ParsePipeline

    settings = Settings()
    engine = _NoEngine(engine_version(_NoEngine.model_id, Vocabulary.load(settings.vocabulary_path),
                                      settings.grounding))
    cache = ParseCache(redis_client(settings.redis_url.get_secret_value()), version=engine.version,
                       ttl_s=settings.cache_ttl_s, prefix=settings.cache_prefix)
    return ParsePipeline(settings, engine, cache)


async def run(bootstrap: str, source: str, sink: str, group: str, session_timeout_s: float,
              core_step: bool = False) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=8 * 1_048_576,
        session_timeout_ms=int(session_timeout_s * 1000),
        heartbeat_interval_ms=1000,
    )
    # The same producer options the worker's Faust producer uses on tansu (no idempotence).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=0)
    pipeline = _core_step() if core_step else None
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announced = False
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            if not announced and consumer.assignment():
                print("ready", flush=True)
                announced = True
            if not batches:
                continue
            if pipeline is not None:
                # Core-step batches of the worker's batch_size, so only the framework differs.
                fetched = [_inbound(record) for records in batches.values() for record in records]
                size = pipeline.settings.batch_size
                pending = []
                for start in range(0, len(fetched), size):
                    outcome = await pipeline.process(fetched[start : start + size])
                    pending.extend([await producer.send(sink, out.value, key=out.key) for out in outcome.parsed])
            else:
                pending = [
                    await producer.send(sink, record.value, key=record.key)
                    for records in batches.values()
                    for record in records
                ]
            await asyncio.gather(*pending)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def _inbound(record: Any) -> Any:
    from workers.pipeline import InboundMessage

    return InboundMessage(value=record.value, key=record.key, topic=record.topic, partition=record.partition,
                          offset=str(record.offset), timestamp_ms=record.timestamp,
                          headers={k: v for k, v in record.headers or () if v is not None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--session-timeout-s", type=float, default=6.0)
    parser.add_argument("--core-step", action="store_true", help="Run qustream's core step on each batch.")
    args = parser.parse_args()
    asyncio.run(run(args.bootstrap, args.source, args.sink, args.group, args.session_timeout_s, args.core_step))


if __name__ == "__main__":
    main()
