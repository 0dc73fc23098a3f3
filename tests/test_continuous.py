"""Continuous batching (``ConstrainedEngine.submit``): same outputs as ``parse_batch`` while rows join
a running batch, in-flight dedupe, failure isolation, cache compaction, cancel and close."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.settings import Settings
from schemas.spec import ParseSpec, load_spec
from tests.engine_fixtures import tiny_loaded
from tests.support import ECOMMERCE_QUERIES
from workers import engine as engine_module
from workers.continuous import BatcherClosed, ContinuousBatcher
from workers.engine import (
    COMPACT_DEAD_COLUMNS,
    ConstrainedEngine,
    DecodeLoop,
    DecodeStats,
    DynamicStepper,
    ParseResult,
    _Row,
)
from workers.model import LoadedModel
from workers.packed import PackedStepper

__all__ = ["tiny_loaded"]

DATA = Path(__file__).resolve().parent / "data"
FURNITURE = load_spec("furniture")
ECOMMERCE = load_spec("ecommerce")


def quality_queries(name: str, count: int) -> list[str]:
    lines = (DATA / f"quality_{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["query"] for line in lines[:count]]


def make_engine(loaded: LoadedModel, spec: ParseSpec = FURNITURE, **overrides: Any) -> ConstrainedEngine:
    settings = Settings(**{"device": loaded.device, "cpu_threads": 2, "batch_size": 4, **overrides})
    return ConstrainedEngine(settings, loaded, spec)


@pytest.fixture
def closing() -> Iterator[list[ConstrainedEngine]]:
    """Engines a test registers here are closed after it, whatever happens."""
    engines: list[ConstrainedEngine] = []
    yield engines
    for engine in engines:
        engine.close()


def batcher_of(engine: ConstrainedEngine) -> ContinuousBatcher:
    assert engine._batcher is not None
    return engine._batcher


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Polls until ``condition`` holds; the bound only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + 300
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def results(futures: list[Future[ParseResult]]) -> list[ParseResult]:
    return [future.result(timeout=600) for future in futures]


# --- the real default model -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize(
    ("spec", "queries"),
    [
        (FURNITURE, quality_queries("furniture", 20)),
        (ECOMMERCE, [*ECOMMERCE_QUERIES, *quality_queries("ecommerce", 14)]),
    ],
    ids=["furniture", "ecommerce"],
)
def test_outputs_match_parse_batch_while_rows_join(
    default_engine: ConstrainedEngine, closing: list[ConstrainedEngine], spec: ParseSpec, queries: list[str],
    layout: str,
) -> None:
    engine = make_engine(default_engine.loaded, spec, batch_size=8, cpu_threads=0, decode_layout=layout)
    closing.append(engine)
    assert engine.packed == (layout == "packed")
    # The reference is the other layout's parse_batch: both layouts and both ways in agree.
    other = make_engine(default_engine.loaded, spec, cpu_threads=0,
                        decode_layout="padded" if layout == "packed" else "packed")
    expected = other.parse_batch(queries)
    # A first wave, then the rest once the loop has run a step: they join mid-decode, and with more
    # queries than batch_size the last ones join as earlier rows leave.
    futures = [engine.submit(q) for q in queries[:3]]
    wait_for(lambda: batcher_of(engine).stats.forwards > 0, "the first step")
    futures += [engine.submit(q) for q in queries[3:]]
    assert results(futures) == expected
    # How many join a running batch depends on when rows finish (a row the grammar alone writes never
    # enters one, and a batch whose rows all finish at once restarts empty): at least one did.
    assert len(queries) > 8 and batcher_of(engine).stats.joined > 0


# --- a tiny random model (mechanics) ----------------------------------------------------------

TINY_QUERIES = quality_queries("furniture", 12)


def count_rows(monkeypatch: pytest.MonkeyPatch, engine: ConstrainedEngine) -> list[str]:
    """The query of every row the engine builds, in order."""
    built: list[str] = []
    new_row = engine._new_row

    def counted(index: int, query: str) -> _Row:
        built.append(query)
        return new_row(index, query)

    monkeypatch.setattr(engine, "_new_row", counted)
    return built


def test_in_flight_dedupe(tiny_loaded: LoadedModel, closing: list[ConstrainedEngine],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_loaded)
    closing.append(engine)
    expected = engine.parse_batch(TINY_QUERIES[:2])
    built = count_rows(monkeypatch, engine)
    # Holding the engine lock keeps the batcher from stepping: both submits find the first in flight.
    with engine._lock:
        first = engine.submit(TINY_QUERIES[0])
        again = engine.submit(TINY_QUERIES[0])
        other = engine.submit(TINY_QUERIES[1])
    assert again is first
    assert other is not first
    assert results([first, other]) == expected
    assert built.count(TINY_QUERIES[0]) == 1
    # Once finished it is no longer in flight: a new submit decodes it again.
    later = engine.submit(TINY_QUERIES[0])
    assert later is not first
    assert later.result(timeout=600) == expected[0]
    assert built.count(TINY_QUERIES[0]) == 2


def test_query_whose_grammar_fails_costs_only_itself(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_loaded)
    closing.append(engine)
    expected = engine.parse_batch(TINY_QUERIES)
    poison = "poison grey sofa"
    build = engine_module.build_row_grammar

    def failing(query: str, *args: Any) -> Any:
        if query == poison:
            raise ValueError("grammar build failed")
        return build(query, *args)

    monkeypatch.setattr(engine_module, "build_row_grammar", failing)
    futures = [engine.submit(q) for q in TINY_QUERIES[:5]]
    bad = engine.submit(poison)
    futures += [engine.submit(q) for q in TINY_QUERIES[5:]]
    with pytest.raises(ValueError, match="grammar build failed"):
        bad.result(timeout=600)
    assert results(futures) == expected


def test_failing_step_costs_only_the_row_that_fails(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_loaded)
    closing.append(engine)
    queries = TINY_QUERIES[:6]
    poison = "red velvet loveseat"  # "red" is a colour candidate: the model must decide, so it steps
    expected = engine.parse_batch(queries)
    settle = engine._settle
    stepped_with_poison: list[int] = []

    def failing(row: _Row, *args: Any) -> None:
        if row.query == poison:
            stepped_with_poison.append(len(stepped_with_poison))
            raise RuntimeError("injected step failure")
        settle(row, *args)

    monkeypatch.setattr(engine, "_settle", failing)
    with engine._lock:  # all of them are in the first step, the poison among them
        futures = [engine.submit(q) for q in queries[:3]]
        bad = engine.submit(poison)
        futures += [engine.submit(q) for q in queries[3:]]
    with pytest.raises(RuntimeError, match="injected step failure"):
        bad.result(timeout=600)
    assert results(futures) == expected
    # It failed once in the shared step and once alone; the loop goes on afterwards.
    assert len(stepped_with_poison) == 2
    assert engine.submit(queries[0]).result(timeout=600) == expected[0]


@pytest.mark.parametrize(("layout", "stepper"), [("padded", DynamicStepper), ("packed", PackedStepper)])
def test_step_that_raises_once_loses_no_row(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine], monkeypatch: pytest.MonkeyPatch,
    layout: str, stepper: type[Any],
) -> None:
    engine = make_engine(tiny_loaded, batch_size=8, decode_layout=layout)
    closing.append(engine)
    expected = engine.parse_batch(TINY_QUERIES)
    step = stepper.step
    raised: list[int] = []

    def once(self: Any, ids: Any, step_mask: Any, positions: Any, **picks: Any) -> Any:
        if not raised and ids.shape[0] > 1:
            raised.append(ids.shape[0])
            raise RuntimeError("CUDA out of memory (injected)")
        return step(self, ids, step_mask, positions, **picks)

    monkeypatch.setattr(stepper, "step", once)
    with engine._lock:
        futures = [engine.submit(q) for q in TINY_QUERIES]
    assert results(futures) == expected
    assert raised and raised[0] > 1


def test_compaction_bounds_the_cache_over_a_stream_of_joins(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One token per step (no jump-forward): the per-row first-step prefill path. Compaction is the
    # padded layout's (its rows share one cache length); packed rows keep their own columns.
    engine = make_engine(tiny_loaded, batch_size=4, jump_forward=False, decode_layout="padded")
    closing.append(engine)
    queries = quality_queries("furniture", 60)
    expected = engine.parse_batch(queries)
    prefix_len = len(engine._prefix_ids)
    lengths: list[int] = []
    dead: list[int] = []
    widths: list[int] = []
    step = DynamicStepper.step

    def recorded(self: DynamicStepper, ids: Any, step_mask: Any, positions: Any) -> Any:
        lengths.append(self.mask.shape[1])
        dead.append(self.mask.shape[1] - int(self.mask.any(dim=0).sum()))
        widths.append(ids.shape[1])
        return step(self, ids, step_mask, positions)

    monkeypatch.setattr(DynamicStepper, "step", recorded)
    futures = [engine.submit(q) for q in queries]
    assert results(futures) == expected
    assert batcher_of(engine).stats.joined >= 40
    longest = max(lengths) - prefix_len
    # Without compaction the cache would hold every column ever appended to the running batch.
    assert sum(widths) > 3 * longest
    assert max(dead) <= COMPACT_DEAD_COLUMNS


@pytest.mark.parametrize("jump_forward", [False, True], ids=["token_by_token", "jump_forward"])
def test_packed_rows_join_in_the_running_rows_step(tiny_loaded: LoadedModel, jump_forward: bool) -> None:
    # Each join costs a padded batch a forward pass of its own; a packed one none.
    queries = TINY_QUERIES[:6]
    forwards = {}
    for layout in ("padded", "packed"):
        # Guessed choices off: right guesses can finish a row in one step, before the next wave joins.
        engine = make_engine(tiny_loaded, jump_forward=jump_forward, decode_layout=layout, guess_choices=0)
        expected = engine.parse_batch(queries)
        rows = [engine._new_row(i, q) for i, q in enumerate(queries)]
        assert not any(row.done for row in rows)
        loop = DecodeLoop(engine, engine._dynamic_stepper, DecodeStats())
        steps = 0
        finished: list[_Row] = []
        with torch.inference_mode():  # as the engine's callers hold it
            for wave in (rows[:2], rows[2:4], rows[4:]):  # a wave joins at each of the first three steps
                loop.add(wave)
                finished += loop.step()
                steps += 1
            while loop.active:
                finished += loop.step()
                steps += 1
        assert sorted(finished, key=lambda r: r.index) == rows
        assert [engine._result(row) for row in rows] == expected
        assert loop.stats.joined == 4
        forwards[layout] = (loop.stats.forwards, steps)
    assert forwards["packed"][0] == forwards["packed"][1]
    assert forwards["padded"][0] == forwards["padded"][1] + 2


def test_cancelled_row_leaves_at_the_next_step(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_loaded, jump_forward=False)
    closing.append(engine)
    victim, survivor = TINY_QUERIES[0], TINY_QUERIES[1]
    expected = engine.parse_batch([survivor])[0]
    steps: list[list[str]] = []
    futures: dict[str, Future[ParseResult]] = {}
    step = DecodeLoop.step

    def cancelling(self: DecodeLoop) -> list[_Row]:
        steps.append([row.query for row in self.active])
        finished = step(self)
        if len(steps) == 1:
            assert victim not in [row.query for row in finished]
            futures[victim].cancel()  # a caller's deadline, while its row decodes
        return finished

    monkeypatch.setattr(DecodeLoop, "step", cancelling)
    with engine._lock:
        futures[victim] = engine.submit(victim)
        futures[survivor] = engine.submit(survivor)
    assert futures[survivor].result(timeout=600) == expected
    with pytest.raises(CancelledError):
        futures[victim].result()
    assert victim in steps[0]
    assert all(victim not in active for active in steps[1:])
    assert len(steps) > 1


def test_close_ends_the_thread_and_fails_pending(tiny_loaded: LoadedModel) -> None:
    engine = make_engine(tiny_loaded, batch_size=1)
    with engine._lock:  # nothing finishes before close: one row admitted at most, the rest waiting
        futures = [engine.submit(q) for q in TINY_QUERIES[:4]]
        batcher = batcher_of(engine)
        closer = threading.Thread(target=engine.close)
        closer.start()
        wait_for(lambda: batcher._closing, "close to begin")
    closer.join()
    assert not batcher._thread.is_alive()
    for future in futures:
        with pytest.raises(BatcherClosed):
            future.result(timeout=0)
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(TINY_QUERIES[0])
    # parse_batch still works on a closed engine's model.
    assert engine.parse_batch(TINY_QUERIES[:1])[0].parse
