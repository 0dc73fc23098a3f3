"""The model reference: the engine alone in a process of its own, loaded and warmed as the worker
does it (settings from the ``QUSTREAM_*`` environment), with no Kafka, Redis or event loop.

A process of its own because inside the benchmark's process the decode loop shares the GIL with the
benchmark's consumer and measured ~30 % slower than the same engine in the worker; an event loop
with ``asyncio.to_thread`` because that is how the worker builds and calls it. Protocol: one
JSON line on stdout when ready (``{"ready": true, "version": ..., "model": ...}``); then for each
JSON list of queries on stdin, parse it in ``batch_size`` chunks and answer ``{"seconds": ...}``.

    python -m bench.engine_alone
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def serve() -> None:
    from schemas.settings import Settings
    from workers.engine import build_engine

    settings = Settings()
    # Built, warmed and called from worker threads exactly as WorkerRuntime does it: built and run on
    # the main thread instead, the same engine measured 4-7x slower on this loaded 2-core machine.
    engine = await asyncio.to_thread(build_engine, settings)
    await asyncio.to_thread(engine.warm_up)
    print(json.dumps({"ready": True, "version": engine.version, "model": engine.model_id}), flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        queries = json.loads(line)
        started = time.perf_counter()
        for start in range(0, len(queries), settings.batch_size):
            await asyncio.to_thread(engine.parse_batch, queries[start : start + settings.batch_size])
        print(json.dumps({"seconds": time.perf_counter() - started, "queries": len(queries)}), flush=True)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
