"""Redis cache of earlier parses, keyed by engine version and normalized query.

A down Redis must never stop parsing: every call degrades to an error (reads: parsed uncached) or
'skipped' (writes), reports the error, and backs off for a few seconds so a dead server does not add
a connect timeout to every batch. ``available`` is the last known state: false from a failed call
until a call (or ``probe``) succeeds again, not only during the backoff.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from pydantic import ConfigDict, TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from typing_extensions import TypedDict  # pydantic needs it for TypedDicts before Python 3.12

from schemas.spec import ParseSpec

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class CachedParse:
    parse: dict[str, Any]
    ungrounded: list[str]


@functools.cache
def entry_adapter(fields: tuple[str, ...]) -> TypeAdapter[Any]:
    """Validates a stored entry in one pydantic-core pass from its bytes: the parse as a plain dict
    with every field of the spec and no others (what the parse model's ``model_dump`` writes), and the
    ungrounded field names. An entry of another shape is a miss."""
    parse_dict = TypedDict("ParseDict", dict.fromkeys(fields, str | None))  # type: ignore[misc]
    parse_dict.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]

    class Entry(TypedDict):
        parse: parse_dict
        ungrounded: list[str]

    return TypeAdapter(Entry)


@dataclass
class CacheLookup:
    hits: dict[str, CachedParse]
    error: bool


def redis_client(url: str, timeout_s: float = 1.0) -> Redis:
    """An asyncio client with short timeouts: the cache is an optimisation, never a dependency."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


class ParseCache:
    def __init__(
        self,
        client: Redis | None,
        *,
        spec: ParseSpec,
        version: str,
        ttl_s: int,
        prefix: str = "qustream:parse",
        backoff_s: float = 5.0,
    ) -> None:
        self._client = client
        self._entry = entry_adapter(spec.field_names)
        self._prefix = f"{prefix}:{version}:".encode()
        self._ttl_s = ttl_s
        self._backoff_s = backoff_s
        self._down_until = 0.0
        #: The last call's outcome: false from a failed call until one succeeds.
        self._reachable = True

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def available(self) -> bool:
        """Whether Redis answered the last call: false from a failed call until one succeeds again
        (``probe`` tries one once the backoff is over, where no traffic does)."""
        return self._client is not None and self._reachable

    def _backing_off(self) -> bool:
        return time.monotonic() < self._down_until

    def key(self, normalized_query: str) -> bytes:
        # Hashed so keys are bounded in length and carry no query text; bytes, which the client
        # sends as they are (a str key is encoded again per command).
        digest = hashlib.blake2b(normalized_query.encode("utf-8"), digest_size=16).hexdigest()
        return self._prefix + digest.encode()

    async def get_many(self, queries: list[str]) -> CacheLookup:
        if not queries or self._client is None:
            return CacheLookup({}, error=False)
        if self._backing_off():
            return CacheLookup({}, error=True)
        try:
            values = await self._client.mget([self.key(q) for q in queries])
        except (RedisError, OSError) as exc:
            self._mark_down("get", exc)
            return CacheLookup({}, error=True)
        self._mark_up()
        hits: dict[str, CachedParse] = {}
        for query, raw in zip(queries, values, strict=True):
            if raw is None:
                continue
            try:
                entry = self._entry.validate_json(raw)
            except ValidationError:
                # A corrupt entry, or one of another schema, is a miss; the fresh parse overwrites it.
                continue
            hits[query] = CachedParse(entry["parse"], entry["ungrounded"])
        return CacheLookup(hits, error=False)

    async def set_many(self, parses: dict[str, CachedParse]) -> bool:
        if not parses or self._client is None or self._backing_off():
            return False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for query, cached in parses.items():
                    value = orjson.dumps({"parse": cached.parse, "ungrounded": cached.ungrounded})
                    pipe.set(self.key(query), value, ex=self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._mark_down("set", exc)
            return False
        self._mark_up()
        return True

    async def ping(self) -> bool:
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def probe(self) -> bool:
        """``available``, after a ``PING`` where Redis was unreachable and the backoff is over: a
        worker with no traffic learns that Redis is back. A failed ping backs off like any call."""
        if self._client is None or self._reachable or self._backing_off():
            return self.available
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self._mark_down("ping", exc)
            return False
        self._mark_up()
        return True

    def _mark_up(self) -> None:
        if not self._reachable:
            self._reachable = True
            log.info("cache.available")

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        self._reachable = False
        self._down_until = time.monotonic() + self._backoff_s
        log.warning("cache.unavailable", operation=operation, error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=self._backoff_s)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
