"""Guessed choices: a pass settles several of a row's choices, the output stays the greedy one."""

from __future__ import annotations

import random

import pytest

from schemas.spec import load_spec
from tests.engine_fixtures import real_loaded, tiny_loaded
from tests.test_continuous import closing, make_engine, quality_queries, results
from workers.drafting import DraftTable, draft_context
from workers.engine import ConstrainedEngine, ParseResult, _Row
from workers.model import LoadedModel

__all__ = ["closing", "real_loaded", "tiny_loaded"]


def test_the_context_is_the_field_and_whether_its_value_began() -> None:
    assert draft_context("") == ("", False)
    assert draft_context('{"item_type":') == ("item_type", False)
    assert draft_context('{"item_type": "oak table", "material":') == ("material", False)
    assert draft_context('{"item_type": "oak') == ("item_type", True)
    assert draft_context('{"brand": null, "size":') == ("size", False)
    # Query words never enter it: two queries at the same place share the context.
    assert draft_context('{"item_type": "sofa') == draft_context('{"item_type": "desk lamp')


def test_a_guess_needs_enough_choices_and_a_clear_lead() -> None:
    table = DraftTable(min_seen=3, min_share=0.5)
    place = ("brand", False)
    for _ in range(2):
        table.learn(place, 7)
    assert table.guess(place) is None  # seen twice only
    table.learn(place, 7)
    assert table.guess(place) == 7
    for _ in range(4):
        table.learn(place, 9)
    assert table.guess(place) == 9  # 4 of 7
    table.learn(place, 7)
    table.learn(place, 8)
    assert table.guess(place) is None  # 4 of 9 each: no clear lead


class ContraryTable(DraftTable):
    """Half the time the learned guess, half the time a token that is often allowed and often wrong:
    guesses are kept and replaced at every kind of place."""

    def __init__(self, engine: ConstrainedEngine, seed: int) -> None:
        super().__init__()
        # '"}' closes the last value and the object in one token: a guess that completes the grammar.
        texts = [" null", ' "', '",', '"', '"}', " ", "s"]
        self._tokens = [engine.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in texts]
        self._random = random.Random(seed)

    def guess(self, context: tuple[str, bool]) -> int | None:
        learned = super().guess(context)
        if learned is not None and self._random.random() < 0.5:
            return learned
        return self._random.choice(self._tokens)


@pytest.mark.parametrize(("spec_name", "grounding"), [("furniture", "catalog"), ("ecommerce", "catalog"),
                                                     ("ecommerce", "span"), ("furniture", "free")])
def test_replaced_guesses_leave_the_greedy_output(tiny_loaded: LoadedModel, spec_name: str, grounding: str) -> None:
    spec = load_spec(spec_name)
    queries = quality_queries(spec_name, 24)
    expected = make_engine(tiny_loaded, spec, guess_choices=0, batch_size=8, grounding=grounding).parse_batch(queries)
    engine = make_engine(tiny_loaded, spec, guess_choices=4, batch_size=8, grounding=grounding)
    engine._guesses = ContraryTable(engine, seed=3)
    assert engine.parse_batch(queries) == expected  # the table learns here
    assert engine.parse_batch(queries) == expected
    stats = engine.last_stats
    # Both ways through: guesses kept (choices settled without a pass) and guesses replaced.
    assert 0 < stats.guesses_kept < stats.guessed


class OracleTable(DraftTable):
    """Guesses the greedy output's next token for the row being planned: every guess is kept, the
    ones that close the whole object included."""

    def __init__(self, greedy: dict[str, list[int]]) -> None:
        super().__init__()
        self.greedy = greedy
        self.row: _Row | None = None

    def guess(self, context: tuple[str, bool]) -> int | None:
        assert self.row is not None
        tokens, written = self.greedy[self.row.query], len(self.row.out_ids)
        return tokens[written] if written < len(tokens) else None


@pytest.mark.parametrize(("spec_name", "grounding"), [("furniture", "free"), ("ecommerce", "span")])
def test_kept_guesses_finish_rows_where_the_grammar_ends(
    tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, spec_name: str, grounding: str
) -> None:
    spec = load_spec(spec_name)
    queries = quality_queries(spec_name, 24)
    plain = make_engine(tiny_loaded, spec, guess_choices=0, batch_size=8, grounding=grounding)
    greedy: dict[str, list[int]] = {}
    result = plain._result

    def recording(row: _Row) -> ParseResult:
        greedy[row.query] = list(row.out_ids)
        return result(row)

    monkeypatch.setattr(plain, "_result", recording)
    expected = plain.parse_batch(queries)
    # Chains long enough to reach the end of every output: each row is parsed in its prefill's pass.
    engine = make_engine(tiny_loaded, spec, guess_choices=64, batch_size=8, grounding=grounding)
    oracle = OracleTable(greedy)
    engine._guesses = oracle
    plan = engine._plan_choices

    def planning(row: _Row, guesses: int) -> None:
        oracle.row = row
        plan(row, guesses)

    monkeypatch.setattr(engine, "_plan_choices", planning)
    assert engine.parse_batch(queries) == expected
    stats = engine.last_stats
    assert stats.guessed > 0 and stats.guesses_kept == stats.guessed
    assert stats.forwards == 1 < plain.last_stats.forwards


def test_replaced_guesses_leave_the_output_of_rows_joining_a_running_batch(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine]
) -> None:
    spec = load_spec("ecommerce")
    queries = quality_queries("ecommerce", 16)
    expected = make_engine(tiny_loaded, spec, guess_choices=0).parse_batch(queries)
    engine = make_engine(tiny_loaded, spec, guess_choices=4)
    closing.append(engine)
    engine._guesses = ContraryTable(engine, seed=5)
    assert results([engine.submit(q) for q in queries]) == expected


def test_learned_guesses_save_passes_of_the_real_model(real_loaded: LoadedModel) -> None:
    spec = load_spec("furniture")
    queries = quality_queries("furniture", 48)
    plain = make_engine(real_loaded, spec, guess_choices=0)
    guessing = make_engine(real_loaded, spec, guess_choices=4)
    expected = plain.parse_batch(queries[24:])
    guessing.parse_batch(queries[:24])  # the table learns from these
    assert guessing.parse_batch(queries[24:]) == expected
    assert guessing.last_stats.guesses_kept > 0
    assert guessing.last_stats.forwards < plain.last_stats.forwards


def test_decoding_totals_count_batches_and_the_continuous_loop(
    tiny_loaded: LoadedModel, closing: list[ConstrainedEngine]
) -> None:
    queries = quality_queries("furniture", 8)
    engine = make_engine(tiny_loaded, guess_choices=4)
    closing.append(engine)
    engine.parse_batch(queries[:4])
    batch = engine.last_stats
    assert engine.decode_totals().forwards == batch.forwards > 0
    results([engine.submit(q) for q in queries[4:]])
    assert engine._batcher is not None
    continuous = engine._batcher.stats
    totals = engine.decode_totals()
    assert continuous.forwards > 0
    assert totals.forwards == batch.forwards + continuous.forwards
    assert totals.decisions == batch.decisions + continuous.decisions
    assert totals.guesses_kept == batch.guesses_kept + continuous.guesses_kept
