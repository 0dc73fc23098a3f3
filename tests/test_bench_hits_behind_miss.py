"""The hits-behind-miss benchmark's backlog: every miss once, evenly spread, the rest cached queries."""

from bench.hits_behind_miss import backlog
from bench.workload import query_pool


def test_the_backlog_spreads_each_miss_once_evenly_among_the_cached_queries() -> None:
    pool = query_pool(13)
    cached, misses = pool[:10], pool[10:]
    queries = backlog(cached, misses, 300)
    assert len(queries) == 300
    positions = [i for i, query in enumerate(queries) if query in misses]
    assert [queries[i] for i in positions] == misses
    assert positions == [50, 150, 250]
    assert all(query in cached for i, query in enumerate(queries) if i not in positions)
