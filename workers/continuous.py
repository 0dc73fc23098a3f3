"""Continuous batching: one decoding loop that queries join at its next step and leave when done.

``ConstrainedEngine.submit`` hands a query to the engine's ``ContinuousBatcher``, which owns a daemon
thread and one ``DecodeLoop`` on the dynamic stepper. At every step boundary the thread takes new
submissions (up to ``capacity`` active rows); on packed steps (``workers.packed``) their prompt
suffixes go into the running rows' forward pass, on padded steps into a pass of their own. A row's
future is resolved the moment its row finishes. With no row active the thread sleeps on the
submission queue.

Each step holds the engine's lock (``parse_batch`` may run from other threads between steps). A step
that raises (CUDA out of memory, a grammar error) costs only the row that causes it: every row of
that step is parsed again alone with ``parse_batch``, and only a row that fails alone gets the
exception.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import TYPE_CHECKING

import structlog

from workers.engine import DecodeLoop, DecodeStats, ParseResult

if TYPE_CHECKING:
    from workers.engine import ConstrainedEngine, _Row

log = structlog.get_logger(__name__)

#: Steps a waiting query is held back while the running batch has less room than a join group.
MAX_HELD_STEPS = 2

_Submission = tuple[str, "Future[ParseResult]"]
_Outcome = ParseResult | BaseException


class BatcherClosed(RuntimeError):
    """The batcher stopped before this query's row finished."""


class ContinuousBatcher:
    """Runs ``engine``'s continuous decoding loop on its own thread; at most ``capacity`` active rows."""

    def __init__(self, engine: ConstrainedEngine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity
        #: Counters since start (forward passes, joins, ...), for tests and metrics.
        self.stats = DecodeStats()
        self._loop = DecodeLoop(engine, engine._dynamic_stepper, self.stats)
        self._queue: queue.SimpleQueue[_Submission | None] = queue.SimpleQueue()
        # Only the batcher thread touches these two.
        self._waiting: deque[_Submission] = deque()
        self._futures: dict[int, Future[ParseResult]] = {}
        self._serial = 0
        #: A batch with fewer free rows than this takes no joiners (for up to MAX_HELD_STEPS steps).
        self.join_group = max(1, capacity // 8)
        self._held_steps = 0
        # Guards the in-flight map and closing; reentrant because a future's done callback takes it.
        self._lock = threading.RLock()
        self._in_flight: dict[str, Future[ParseResult]] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="qustream-continuous", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, query: str) -> Future[ParseResult]:
        """Queue ``query``; the same query already in flight shares its future. Cancelling the
        future drops the row at the next step, for every caller holding it."""
        with self._lock:
            future = self._in_flight.get(query)
            if future is not None and not future.done():
                return future
            future = Future()
            if self._closing:
                future.set_exception(BatcherClosed("the engine's continuous batcher is closed"))
                return future
            self._in_flight[query] = future
            future.add_done_callback(partial(self._forget, query))
            self._queue.put((query, future))
        return future

    def close(self) -> None:
        """Stop the thread after its current step; futures not yet resolved get ``BatcherClosed``."""
        with self._lock:
            self._closing = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ----------------------------------------------------------------------------------------
    def _forget(self, query: str, future: Future[ParseResult]) -> None:
        with self._lock:
            if self._in_flight.get(query) is future:
                del self._in_flight[query]

    def _run(self) -> None:
        import torch

        error: BaseException | None = None
        try:
            with torch.inference_mode():
                while self._take_submissions():
                    self._step()
        except BaseException as exc:
            # A defect here must not leave callers waiting forever: fail what is pending.
            log.exception("continuous.crashed")
            error = exc
        finally:
            self._fail_pending(error)

    def _take_submissions(self) -> bool:
        """Move queued submissions to the waiting line; sleeps while nothing is to do. False: stop."""
        block = not self._loop.active and not self._waiting
        while not self._closing:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            self._waiting.append(item)
            block = False
        return False

    def _step(self) -> None:
        engine = self.engine
        ready: list[tuple[Future[ParseResult], _Outcome]] = []
        failed: list[_Row] = []
        error: Exception | None = None
        with engine._lock:
            if self._closing:
                return
            self._drop_cancelled()
            joining = self._admit(ready)
            involved = [*self._loop.active, *joining]
            try:
                self._loop.add(joining)
                finished = self._loop.step()
            except Exception as exc:
                error = exc
                self._loop.reset()
                failed = involved
            else:
                ready += [(self._futures.pop(row.index), self._outcome(row)) for row in finished]
        _resolve(ready)
        # Every step of a running loop is of middling size: without a trim its freed tensors leave a
        # fragmented heap that the worker keeps for good.
        engine.release_freed_memory()
        if error is not None:
            self._retry_alone(failed, error)

    def _drop_cancelled(self) -> None:
        leaving = [row for row in self._loop.active if self._futures[row.index].done()]
        if leaving:
            self._loop.drop(leaving)
            for row in leaving:
                del self._futures[row.index]

    def _admit(self, ready: list[tuple[Future[ParseResult], _Outcome]]) -> list[_Row]:
        """Rows for waiting queries, as many as there is room for; rows the grammar alone finishes
        (and queries whose row cannot be built) go straight to ``ready``."""
        rows: list[_Row] = []
        room = self.capacity - len(self._loop.active)
        if self._loop.active and self._waiting and room < self.join_group and not self.engine.packed:
            # On padded steps each join costs the running batch a forward pass of its own: a full
            # batch takes joiners a group at a time, unless they have waited a few steps already.
            self._held_steps += 1
            if self._held_steps < MAX_HELD_STEPS:
                return rows
        self._held_steps = 0
        while self._waiting and len(rows) < room:
            query, future = self._waiting.popleft()
            if future.done():
                continue
            try:
                row = self.engine._new_row(self._serial, query)
            except Exception as exc:
                ready.append((future, exc))
                continue
            self._serial += 1
            if row.done:
                ready.append((future, self._outcome(row)))
            else:
                self._futures[row.index] = future
                rows.append(row)
        return rows

    def _outcome(self, row: _Row) -> _Outcome:
        try:
            return self.engine._result(row)
        except Exception as exc:
            return exc

    def _retry_alone(self, rows: list[_Row], error: Exception) -> None:
        """After a failed step: each of its rows again, alone, from scratch."""
        log.warning("continuous.step_failed", rows=len(rows), error=repr(error))
        self._free_device_memory()
        for row in rows:
            if self._closing:
                return
            future = self._futures.pop(row.index)
            if future.done():
                continue
            outcome: _Outcome
            try:
                outcome = self.engine.parse_batch([row.query])[0]
            except Exception as alone:
                log.warning("continuous.row_failed", query_chars=len(row.query), error=repr(alone))
                outcome = alone
            _resolve([(future, outcome)])

    def _free_device_memory(self) -> None:
        if self.engine.loaded.device == "cuda":
            import torch

            # The failed step's cache is unreferenced now; hand its blocks back before the retries.
            torch.cuda.empty_cache()

    def _fail_pending(self, error: BaseException | None) -> None:
        with self._lock:
            self._closing = True
        pending = [*self._futures.values(), *(future for _, future in self._waiting)]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item[1])
        self._futures.clear()
        self._waiting.clear()
        self._loop.reset()
        closed = BatcherClosed("the engine's continuous batcher stopped before this query was parsed")
        closed.__cause__ = error
        _resolve([(future, closed) for future in pending])


def _resolve(outcomes: list[tuple[Future[ParseResult], _Outcome]]) -> None:
    for future, outcome in outcomes:
        try:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        except InvalidStateError:
            # Cancelled by its caller since the row was last looked at.
            pass
