"""``qustream load``: synthetic search traffic at a target rate.

Queries are drawn from a vocabulary of ``unique`` distinct queries with a Zipf distribution
(rank k has weight 1 / k^alpha): a few head queries ("sofa", "bar stool") repeat constantly and a
long tail of specific ones ("mustard velvet mid-century armchair") shows up once or twice, as in
real search logs. That mix is what makes cache hit rates and batch dedupe realistic.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producer_tools.transport import RecordSink
from schemas.spec import load_spec

SAMPLE_QUERIES = Path(__file__).with_name("data") / "sample_queries.jsonl"

ITEMS = [
    "sofa", "sectional sofa", "loveseat", "armchair", "accent chair", "recliner", "dining chair", "office chair",
    "bar stool", "counter stool", "ottoman", "bench", "coffee table", "side table", "console table",
    "dining table", "desk", "standing desk", "bookcase", "bookshelf", "tv stand", "sideboard", "dresser",
    "nightstand", "wardrobe", "bed frame", "headboard", "bunk bed", "daybed", "chaise lounge", "futon",
    "sleeper sofa", "rocking chair", "vanity", "shoe rack", "coat rack", "filing cabinet", "kitchen island",
    "patio chair", "outdoor sofa", "hammock", "bean bag", "chair and a half recliner", "storage cabinet",
]
FEATURES = ["with storage", "with drawers", "for small spaces", "set of 2", "with cushions", "on wheels",
            "with armrests", "extendable", "queen size", "king size", "adjustable height", "with usb ports"]


def _values(field: str) -> list[str]:
    """Canonical values and their surface forms of one field of the furniture spec (what shoppers type)."""
    out: list[str] = []
    for entry in load_spec("furniture").field(field).values:
        out.append(entry.value)
        out.extend(entry.forms[:2])
    return out


def build_vocabulary(unique: int, seed: int = 7) -> list[str]:
    """``unique`` distinct queries, most popular first: the sample log's queries by frequency, then
    generated colour/material/style/item/feature combinations."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    if SAMPLE_QUERIES.exists():
        for line in SAMPLE_QUERIES.read_text(encoding="utf-8").splitlines():
            try:
                query = json.loads(line).get("query")
            except (ValueError, AttributeError):
                continue
            if isinstance(query, str) and query.strip():
                counts[query] = counts.get(query, 0) + 1
    vocabulary = sorted(counts, key=lambda q: -counts[q])[:unique]
    seen = set(vocabulary)
    colors, materials, styles = _values("color") or ["grey"], _values("material") or ["oak"], _values("style") or [""]
    attempts = 0
    while len(vocabulary) < unique and attempts < unique * 50:
        attempts += 1
        words = [
            rng.choice(colors) if rng.random() < 0.5 else "",
            rng.choice(materials) if rng.random() < 0.4 else "",
            rng.choice(styles) if rng.random() < 0.25 else "",
            rng.choice(ITEMS),
            rng.choice(FEATURES) if rng.random() < 0.2 else "",
        ]
        query = " ".join(word for word in words if word)
        if query not in seen:
            seen.add(query)
            vocabulary.append(query)
    return vocabulary


class ZipfSampler:
    def __init__(self, vocabulary: list[str], alpha: float, seed: int) -> None:
        self.vocabulary = vocabulary
        self.cumulative = list(itertools.accumulate(1.0 / (rank ** alpha) for rank in range(1, len(vocabulary) + 1)))
        self.rng = random.Random(seed)

    def draw(self) -> str:
        point = self.rng.random() * self.cumulative[-1]
        return self.vocabulary[min(bisect.bisect_left(self.cumulative, point), len(self.vocabulary) - 1)]


@dataclass
class LoadSummary:
    sent: int
    elapsed_s: float
    target_rate: float
    distinct: int
    top_share: float

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "seconds": round(self.elapsed_s, 3),
            "target_rate": self.target_rate,
            "achieved_rate": round(self.rate, 1),
            "rate_error": f"{(self.rate / self.target_rate - 1):+.1%}" if self.target_rate else "n/a",
            "distinct_queries": self.distinct,
            "top10_share": f"{self.top_share:.0%}",
        }


async def generate_load(
    sink: RecordSink,
    *,
    rate: float,
    duration_s: float | None = None,
    count: int | None = None,
    alpha: float = 1.1,
    unique: int = 5_000,
    seed: int | None = None,
    stop: asyncio.Event | None = None,
    progress: Any | None = None,
) -> LoadSummary:
    """Send ``count`` queries (or ``rate × duration_s``) paced at ``rate``/s on a fixed schedule.

    The schedule is absolute (record i is due at start + i / rate), so a slow moment is caught up
    rather than lowering the average; the achieved rate is measured up to the last acknowledgement.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if count is None:
        if duration_s is None:
            raise ValueError("give a duration or a count")
        count = round(rate * duration_s)
    run = uuid.uuid4().hex[:8]
    sampler = ZipfSampler(build_vocabulary(unique), alpha, seed if seed is not None else random.randrange(1 << 30))
    frequency: dict[str, int] = {}
    started = time.perf_counter()
    sent = 0
    for index in range(count):
        if stop is not None and stop.is_set():
            break
        wait = started + index / rate - time.perf_counter()
        if wait > 0.002:
            await sink.push()
            await asyncio.sleep(wait)
        query = sampler.draw()
        frequency[query] = frequency.get(query, 0) + 1
        query_id = f"load-{run}-{index}"
        payload = {"query": query, "query_id": query_id, "ts": datetime.now(UTC).isoformat(), "source": "load"}
        await sink.send(query_id.encode(), json.dumps(payload).encode(), None, None)
        sent += 1
        if progress is not None:
            progress(1)
    await sink.flush()
    elapsed = time.perf_counter() - started
    # The last record is due at (count - 1) / rate: measure over the same span the schedule covers.
    effective = elapsed * (sent / max(sent - 1, 1)) if sent > 1 else elapsed
    top = sum(sorted(frequency.values(), reverse=True)[:10])
    return LoadSummary(sent, effective, rate, len(frequency), top / sent if sent else 0.0)
