"""Where a worker's time goes: py-spy collapsed stacks folded into a few named buckets."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from typing import Any

#: (bucket, substrings of a stack that put a sample in it); the first match wins, so the more
#: specific buckets (the core step's parts) come before the framework catch-alls.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core step: decode input (pydantic QueryInput, normalize)", ("decode_message",)),
    # redis-py runs its socket writes as separate loop callbacks, outside the step's stack.
    ("core step: Redis lookup (incl. socket writes)", ("ParseCache.", "redis/")),
    ("core step: build ParsedEvent + JSON, other", ("ParsePipeline.",)),
    ("runtime.record: metrics + progress log", ("WorkerRuntime.record",)),
    ("publish: producer batches per partition", ("BatchPublisher.", "FaustDelivery._publish")),
    ("record conversion (both runners), Faust per-event ack", ("Stream.ack", "inbound_from_")),
    ("aiokafka producer: produce requests (socket writes)", ("Sender.", "aiokafka/producer/")),
    ("aiokafka consumer: fetch, unpack records", ("Fetcher", "aiokafka/consumer/")),
    ("batch runner: lock, delivery, offsets", ("KafkaBatchRunner.", "KafkaDelivery.")),
    ("Faust consumer: conductor, events in", ("_drain_messages", "on_message", "Conductor")),
    ("Faust stream / take / agent machinery", ("faust/streams.py", "faust/agents/", "Stream.")),
    ("event loop: waiting in select", ("EpollSelector.select",)),
    ("Faust/mode services, timers, commits", ("faust/", "mode/services.py", "mode/threads.py", "mode/utils/",
                                              "mode/timers.py")),
    ("aiokafka consumer / client", ("aiokafka/",)),
    ("asyncio scheduling, other", ("asyncio/",)),
)

_PATH = re.compile(r" \((?:/[^()]*/)?(?:site-packages/)?([^()]*?):\d+\)")


def py_spy_available() -> bool:
    return shutil.which("py-spy") is not None


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Buckets (share of samples) plus the hottest leaf functions, from ``py-spy --format raw`` output."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        bucket = next((name for name, keys in BUCKETS if any(key in stack for key in keys)), "other")
        buckets[bucket] += count
        leaves[_PATH.sub(r" (\1)", stack.split(";")[-1])] += count
    if not total:
        return {"samples": 0, "buckets": {}, "hottest": {}}
    return {
        "samples": total,
        "buckets": {name: round(n / total, 4) for name, n in buckets.most_common()},
        "hottest": {name: round(n / total, 4) for name, n in leaves.most_common(top)},
    }
