"""Synthetic furniture queries for the pipeline benchmark: a large pool of distinct, realistic
queries (with the parse each one describes) and a Zipf-distributed replay over part of it.

The pool is built from the catalog vocabulary and real item types, so query lengths and token
counts match real traffic; that matters because the model's cost grows with token positions.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.spec import load_spec
from workers.normalize import normalize_query

_ROOT = Path(__file__).resolve().parent.parent
_QUALITY = _ROOT / "tests" / "data" / "quality_furniture.jsonl"

_ITEMS = (
    "sofa", "sectional sofa", "loveseat", "armchair", "accent chair", "recliner", "office chair", "desk chair",
    "dining chair", "bar stool", "counter stool", "ottoman", "bench", "coffee table", "side table", "end table",
    "console table", "dining table", "kitchen table", "desk", "writing desk", "bookshelf", "bookcase", "tv stand",
    "media console", "dresser", "chest of drawers", "nightstand", "bed frame", "platform bed", "bunk bed",
    "headboard", "wardrobe", "sideboard", "buffet", "cabinet", "shoe rack", "coat rack", "floor lamp",
    "table lamp", "rug", "mirror", "futon", "daybed", "chaise lounge", "rocking chair", "swivel chair",
    "patio chair", "outdoor lounge chair", "hammock", "crib", "changing table", "vanity", "storage bench",
)
_EXTRAS = (
    "", "", "", "", "with drawers", "with storage", "set of 2", "set of 4", "for small spaces", "with arms",
    "queen size", "king size", "for 6", "72 inch", "round", "square", "extendable", "folding", "adjustable",
    "with cushions", "for living room", "for bedroom", "on sale", "cheap", "under 500",
)


@dataclass(frozen=True)
class BenchQuery:
    text: str
    parse: dict[str, str | None]

    @property
    def normalized(self) -> str:
        return normalize_query(self.text)


def _values(field: str) -> list[str]:
    return load_spec("furniture").field(field).canonical_values


def _items() -> list[str]:
    items = set(_ITEMS)
    if _QUALITY.exists():
        for line in _QUALITY.read_text().splitlines():
            value = json.loads(line).get("item_type")
            if isinstance(value, str):
                items.add(value)
    return sorted(items)


def query_pool(size: int, seed: int = 20261122) -> list[BenchQuery]:
    """``size`` distinct queries (distinct after normalization), deterministic for a seed."""
    rng = random.Random(seed)
    items, materials, colors, styles = _items(), _values("material"), _values("color"), _values("style")
    seen: set[str] = set()
    pool: list[BenchQuery] = []
    attempts = 0
    while len(pool) < size:
        attempts += 1
        if attempts > size * 200:
            raise ValueError(f"cannot build {size} distinct queries from the vocabulary")
        style = rng.choice(styles) if rng.random() < 0.25 else None
        color = rng.choice(colors) if rng.random() < 0.55 else None
        material = rng.choice(materials) if rng.random() < 0.55 else None
        item = rng.choice(items)
        extra = rng.choice(_EXTRAS)
        words = [w for w in (style, color, material, item, extra) if w]
        text = " ".join(words)
        key = normalize_query(text)
        if key in seen:
            continue
        seen.add(key)
        pool.append(BenchQuery(text, {"item_type": item, "material": material, "color": color, "style": style}))
    return pool


def zipf_ranks(count: int, universe: int, exponent: float, seed: int) -> list[int]:
    """``count`` ranks in [0, universe) with P(rank k) ∝ 1 / (k+1)^exponent (a bounded Zipf law)."""
    weights = 1.0 / np.power(np.arange(1, universe + 1, dtype=np.float64), exponent)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    return [int(r) for r in rng.choice(universe, size=count, p=weights)]


def expected_distinct(count: int, universe: int, exponent: float, skip: int = 0) -> float:
    """Expected distinct ranks among ``count`` Zipf draws, counting only ranks from ``skip`` on: the
    misses of a cache that starts with ranks [0, skip) in it."""
    weights = 1.0 / np.power(np.arange(1, universe + 1, dtype=np.float64), exponent)
    weights /= weights.sum()
    return float(np.sum(1.0 - np.power(1.0 - weights[skip:], count)))


def head_for_hit_ratio(count: int, universe: int, exponent: float, hit_ratio: float) -> int:
    """The fewest top ranks to pre-cache so that ``count`` Zipf draws are expected to hit the cache
    ``hit_ratio`` of the time (a draw hits when its rank was pre-cached or drawn before)."""
    expected = [1 - expected_distinct(count, universe, exponent, skip=head) / count for head in range(universe + 1)]
    return bisect.bisect_left(expected, hit_ratio)


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times in [0, ``seconds``) of a Poisson process of ``rate`` per second."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    now = 0.0
    while True:
        now += float(rng.exponential(1 / rate))
        if now >= seconds:
            return times
        times.append(now)
