"""``POST /parse`` as a careless or hostile client uses it: every bad request gets a 4xx that says
what is wrong; the only 5xx are 503 (no bridge) and 504 (no parse in time). Property-based: hypothesis
throws arbitrary bytes and arbitrary JSON at the real aiohttp app over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.events import ParsedEvent
from schemas.settings import Settings
from streams.query_client import RedisQueryClient
from streams.runtime import WorkerRuntime
from streams.web import build_web_app, listening_ports, start_web

#: A bridge with no worker behind it never gets its reply: each valid request costs this long.
REPLY_WAIT_S = 0.2
EXAMPLES = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

Post = Callable[[bytes], tuple[int, Any]]


@pytest.fixture
def post(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> Iterator[Post]:
    """``POST /parse`` on a live app: with a bridge to Redis Streams when the test is marked
    ``bridged`` (no worker reads the stream, so valid requests time out), else with none."""
    config = make_settings(transport="redis", parse_timeout_s=REPLY_WAIT_S)
    runtime = WorkerRuntime(config)
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(build_web_app(runtime)), loop=loop)
    loop.run_until_complete(client.start_server())
    query_client: RedisQueryClient | None = None
    if request.node.get_closest_marker("bridged"):
        query_client = RedisQueryClient(config)

        async def bridge(query: str, timeout_s: float) -> ParsedEvent:
            assert query_client is not None
            return await query_client.parse(query, timeout=min(timeout_s, REPLY_WAIT_S))

        runtime.bridge = bridge

    def send(body: bytes) -> tuple[int, Any]:
        async def call() -> tuple[int, Any]:
            response = await client.post("/parse", data=body, headers={"Content-Type": "application/json"})
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

        return loop.run_until_complete(call())

    yield send
    if query_client is not None:
        loop.run_until_complete(query_client.client.delete(config.stream_input))
        loop.run_until_complete(query_client.close())
    loop.run_until_complete(client.close())
    loop.run_until_complete(runtime.close())
    loop.close()


def assert_answered_well(status: int, body: Any, allowed_5xx: set[int]) -> None:
    assert status < 500 or status in allowed_5xx, (status, body)
    if 400 <= status < 500:
        assert isinstance(body, dict) and body.get("error"), body
        assert body.get("detail"), f"a {status} without saying what is wrong: {body}"


@EXAMPLES
@given(body=st.binary(max_size=512))
@example(body=b'{"query": "\xff\xfe"}')
@example(body=b'{"query": "red sofa", "timeout_s": NaN}')
@example(body=b"")
def test_arbitrary_bytes_get_a_4xx_that_says_why(post: Post, body: bytes) -> None:
    status, answer = post(body)
    assert_answered_well(status, answer, {503})


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
                    max_leaves=8)
REQUESTS = st.fixed_dictionaries({}, optional={"query": JSON | st.text(), "timeout_s": JSON | st.floats()})


@pytest.mark.bridged
@EXAMPLES
@given(payload=REQUESTS | JSON, escaped=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
@example(payload={"query": "red sofa"}, escaped=False, encoding="utf-8")
@example(payload={"query": "\x00\x07"}, escaped=True, encoding="utf-8")
@example(payload={"query": "\ud800 sofa"}, escaped=True, encoding="utf-8")
@example(payload={"query": "sofa", "timeout_s": float("inf")}, escaped=True, encoding="utf-8")
def test_arbitrary_json_gets_a_4xx_or_goes_through_the_bridge(
    post: Post, payload: Any, escaped: bool, encoding: str
) -> None:
    try:
        body = json.dumps(payload, ensure_ascii=escaped).encode(encoding)
    except UnicodeEncodeError:  # a lone surrogate, or a character latin-1 lacks: sent escaped instead
        body = json.dumps(payload).encode()
    status, answer = post(body)
    assert_answered_well(status, answer, {504})


def test_without_a_bridge_a_valid_request_gets_503(post: Post) -> None:
    status, answer = post(b'{"query": "red sofa"}')
    assert status == 503 and answer["error"] == "the stream bridge is not running"
    assert "GET /ready says which" in answer["detail"]


@pytest.mark.bridged
def test_with_no_worker_behind_the_bridge_a_valid_request_gets_504(post: Post) -> None:
    status, answer = post(b'{"query": "red sofa", "timeout_s": 0.1}')
    assert status == 504 and "no parse within" in answer["error"] and "may still be parsed" in answer["detail"]


def test_a_body_that_is_not_utf8_is_named_as_such(post: Post) -> None:
    status, answer = post(b'{"query": "\xff\xfe"}')
    assert status == 400 and "not valid UTF-8" in answer["detail"][0]["msg"]


async def test_web_port_0_listens_on_a_free_port_that_the_worker_can_name() -> None:
    """``QUSTREAM_WEB_PORT=0`` takes any free port; the worker logs which one, or nobody could reach it."""
    runner = await start_web(WorkerRuntime(Settings(web_port=0, web_host="127.0.0.1")))
    try:
        [port] = listening_ports(runner)
        assert port > 0
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as answer:
            assert answer.status in (200, 503)
    finally:
        await runner.cleanup()
