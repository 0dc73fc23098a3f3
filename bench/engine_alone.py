"""The model reference: the engine alone in a process of its own, loaded and warmed as the worker
does it (settings from the ``QUSTREAM_*`` environment), with no Kafka, Redis or event loop.

A process of its own because inside the benchmark's process the decode loop shares the GIL with the
benchmark's consumer and measured ~30 % slower than the same engine in the worker; an event loop
and one engine thread because that is how the worker builds and calls it. Protocol: one
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
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def serve() -> None:
    from schemas.settings import Settings
    from workers.engine import build_engine

    settings = Settings()
    # Built, warmed and called on one thread beside the event loop, exactly as WorkerRuntime does it:
    # built and run on the main thread instead, the same engine measured 4-7x slower on this loaded
    # 2-core machine.
    loop = asyncio.get_running_loop()
    engine_thread = ThreadPoolExecutor(1, thread_name_prefix="qustream-engine")
    engine = await loop.run_in_executor(engine_thread, build_engine, settings)
    await loop.run_in_executor(engine_thread, engine.warm_up)
    print(json.dumps({"ready": True, "version": engine.version, "model": engine.model_id}), flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        queries = json.loads(line)
        started = time.perf_counter()
        for start in range(0, len(queries), settings.batch_size):
            await loop.run_in_executor(engine_thread, engine.parse_batch, queries[start : start + settings.batch_size])
        print(json.dumps({"seconds": time.perf_counter() - started, "queries": len(queries)}), flush=True)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
