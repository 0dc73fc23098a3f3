"""The transport reference: a plain aiokafka consume → produce pass-through, nothing else.

It runs in its own process, like the worker, with the same delivery contract (consumer group,
acks=all, offsets committed only after the outputs are acknowledged), so the gap between it and
the worker on the same messages is what qustream itself costs.

    python -m bench.passthrough --bootstrap 127.0.0.1:9092 --source in --sink out --group g
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def run(bootstrap: str, source: str, sink: str, group: str, session_timeout_s: float) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--session-timeout-s", type=float, default=6.0)
    args = parser.parse_args()
    asyncio.run(run(args.bootstrap, args.source, args.sink, args.group, args.session_timeout_s))


if __name__ == "__main__":
    main()
