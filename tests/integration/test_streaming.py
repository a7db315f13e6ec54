"""Streaming against the simulated gateway: failover before the first chunk, never after."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from holysheep_lb import AllAttemptsFailedError, ChatStream, StreamInterruptedError
from holysheep_lb.simulator import SimNode, SimulatedGateway, reply_text

from ..conftest import wait_until

MODEL = "gpt-4.1"
MSGS = [{"role": "user", "content": "one two three four five six"}]
TEXT = reply_text(MODEL, MSGS)  # "[gpt-4.1] Echo: one two three four five six"
WORDS = TEXT.split()
# the simulator sends a role chunk, one chunk per word, a finish chunk and a usage chunk
CHUNKS = 1 + len(WORDS) + 2


@pytest.fixture
def gw():
    gateway = SimulatedGateway([SimNode("a"), SimNode("b"), SimNode("c")], seed=3)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop(timeout_s=3.0)


@pytest.fixture
def client(gw, make_client):
    return make_client(gw.client_nodes(), strategy="round_robin", stream_first_chunk_timeout_s=2.0,
                       stream_stall_timeout_s=2.0, backoff_base_s=0.001)


def pools(client):
    """Every node's urllib3 connection pool."""
    out = []
    for node in client.selector.nodes:
        manager = node.transport.session.get_adapter(node.node.base_url).poolmanager
        out.extend(manager.pools[key] for key in manager.pools.keys())
    return out


def test_stream_text_equals_the_non_streaming_answer(gw, client):
    answer = client.chat_completion(MSGS, model=MODEL)
    with client.chat_completion(MSGS, model=MODEL, stream=True) as stream:
        chunks = list(stream)
    assert isinstance(stream, ChatStream)
    assert answer.text == TEXT
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == TEXT
    assert stream.text == TEXT and stream.state == "completed" and stream.finish_reason == "stop"
    assert len(chunks) == stream.chunks == CHUNKS
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert stream.latency_ms is not None and 0 < stream.ttft_ms <= stream.latency_ms


def test_finished_streams_reuse_one_keep_alive_connection(gw, make_client):
    client = make_client(gw.client_nodes()[:1])
    for _ in range(3):
        assert client.chat_completion(MSGS, model=MODEL, stream=True).read_text() == TEXT
    [pool] = pools(client)
    assert pool.num_connections == 1 and pool.pool.qsize() == pool.pool.maxsize


@pytest.mark.parametrize("fault", [
    {"fault": "reset"},
    {"error_rate": 1.0},
    {"rate_limit_rate": 1.0, "retry_after_s": 30},
    {"fault": "hang"},  # no first chunk within stream_first_chunk_timeout_s
])
def test_failure_before_the_first_chunk_streams_from_another_node(gw, make_client, fault):
    gw.configure("a", **fault)
    client = make_client(gw.client_nodes(), strategy="round_robin", stream_first_chunk_timeout_s=0.3,
                         backoff_base_s=0.001)
    stream = client.chat_completion(MSGS, model=MODEL, stream=True)
    assert stream.read_text() == TEXT
    assert stream.node_id == "b"
    assert [(a.node_id, a.ok) for a in stream.attempts] == [("a", False), ("b", True)]
    assert gw.request_count("b", "/v1/chat/completions") == 1
    stats = client.stats()
    assert stats["in_flight"] == 0 and stats["streams"]["completed"] == 1


def test_the_deadline_bounds_the_wait_for_a_first_chunk(gw, make_client):
    for node in ("a", "b", "c"):
        gw.configure(node, fault="hang")
    client = make_client(gw.client_nodes(), stream_first_chunk_timeout_s=30.0, deadline_s=0.4)
    started = time.monotonic()
    with pytest.raises(AllAttemptsFailedError, match="deadline exceeded"):
        client.chat_completion(MSGS, model=MODEL, stream=True)
    assert time.monotonic() - started < 2.0
    assert client.stats()["in_flight"] == 0


def test_node_dying_mid_stream_raises_with_the_partial_text(gw, make_client):
    for node in ("a", "b", "c"):
        gw.configure(node, stream_fault="reset_midstream", stream_fault_after_chunks=2, chunk_delay_ms=20)
    client = make_client(gw.client_nodes(), strategy="round_robin", stream_first_chunk_timeout_s=2.0,
                         stream_stall_timeout_s=2.0, backoff_base_s=0.001, stream_rescue="off")
    stream = client.chat_completion(MSGS, model=MODEL, stream=True)
    received = []
    with pytest.raises(StreamInterruptedError) as info:
        for chunk in stream:
            received.append(chunk)
    err = info.value
    assert err.reason == "reset" and err.node_id == stream.node_id == "a"
    assert err.partial_text == WORDS[0] + " " + WORDS[1] + " "  # role chunk + two words arrived
    assert err.chunks == len(received) == 3
    assert sum(gw.request_count(n, "/v1/chat/completions") for n in "abc") == 1  # never retried
    stats = client.stats()
    assert stats["in_flight"] == 0
    assert stats["nodes"]["a"]["failures"]["connect"] == 1
    assert stats["streams"]["interrupted"] == 1


def test_stalled_node_hits_the_stall_timeout(gw, make_client):
    for node in ("a", "b", "c"):
        gw.configure(node, stream_fault="stall_midstream", stream_fault_after_chunks=1)
    client = make_client(gw.client_nodes(), strategy="round_robin", stream_stall_timeout_s=0.3)
    stream = client.chat_completion(MSGS, model=MODEL, stream=True)
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    waited = time.monotonic() - started
    assert 0.25 <= waited < 2.0
    assert info.value.reason == "stall" and info.value.partial_text == WORDS[0] + " "
    stats = client.stats()
    assert stats["in_flight"] == 0 and stats["nodes"]["a"]["failures"]["stall"] == 1


def test_200_streams_abandoned_after_one_chunk_leak_nothing(gw, client):
    for node in ("a", "b", "c"):
        gw.configure(node, chunk_delay_ms=2)
    selector = client.selector
    counts = {"pick": 0, "release": 0}
    counts_lock = threading.Lock()

    def counted(method, key):
        def wrapper(*args, **kwargs):
            with counts_lock:
                counts[key] += 1
            return method(*args, **kwargs)
        return wrapper

    selector.pick = counted(selector.pick, "pick")
    for name in ("release_success", "release_failure", "release_cancelled"):
        setattr(selector, name, counted(getattr(selector, name), "release"))

    def abandon(i):
        stream = client.chat_completion(MSGS, model=MODEL, stream=True)
        first = next(stream)
        assert first["object"] == "chat.completion.chunk"
        if i % 3 == 0:
            stream.close()
        elif i % 3 == 1:
            with stream:
                for _ in stream:
                    break
        # i % 3 == 2: simply dropped; the garbage collector and the reaper release it

    with ThreadPoolExecutor(max_workers=8) as executor:
        list(executor.map(abandon, range(200)))
    gc.collect()
    stats = client.stats()
    assert stats["in_flight"] == 0
    assert counts["pick"] == counts["release"] == 200
    assert stats["streams"]["cancelled"] == 200 and stats["calls"] == 200
    for pool in pools(client):
        assert pool.pool.qsize() == pool.pool.maxsize  # every connection slot came back
    assert wait_until(lambda: sum(gw.in_flight(n) for n in "abc") == 0)  # the server saw each hang-up
    assert client.chat_completion(MSGS, model=MODEL).text == TEXT
    assert client.chat_completion(MSGS, model=MODEL, stream=True).read_text() == TEXT


def test_stream_usage_is_counted(gw, client):
    answer = client.chat_completion(MSGS, model=MODEL)
    ended = []
    original = client._stream_ended
    client._stream_ended = lambda outcome: (ended.append((outcome.model, outcome.usage)), original(outcome))
    streams = [client.chat_completion(MSGS, model=MODEL, stream=True) for _ in range(2)]
    for stream in streams:
        stream.read_text()
        assert stream.usage == answer["usage"]
    assert ended == [(MODEL, answer["usage"])] * 2
    usage = client.stats()["streams"]["usage"]
    assert usage == {k: 2 * v for k, v in answer["usage"].items()}
    # without include_usage the simulator reports none, and nothing is counted
    quiet = client.chat_completion(MSGS, model=MODEL, stream=True, stream_options={"include_usage": False})
    assert quiet.read_text() == TEXT and quiet.usage is None
    assert client.stats()["streams"]["usage"] == usage
    assert client.stats()["streams"]["streams_with_usage"] == 2



def test_streams_that_break_mid_way_trip_the_breakers_and_cancelled_ones_do_not(gateway_factory, make_client):
    from holysheep_lb import CircuitOpenError, StreamInterruptedError
    gw = gateway_factory([{"id": "a", "stream_fault": "reset_midstream", "stream_fault_after_chunks": 1}])
    client = make_client(gw.client_nodes(), breaker={"fail_max": 2, "reset_timeout_s": 600},
                         node_breakers={"fail_max": 2, "reset_timeout_s": 600})
    msgs = [{"role": "user", "content": "hello there general kenobi"}]
    for _ in range(3):  # streams closed early say nothing about the model or the node
        with client.chat_completion(msgs, model="gpt-4.1", stream=True) as stream:
            next(iter(stream))
    assert {b["name"]: b["failures"] for b in client.breakers()} == {"model:gpt-4.1": 0, "node:a": 0}
    for _ in range(2):
        with pytest.raises(StreamInterruptedError):
            client.chat_completion(msgs, model="gpt-4.1", stream=True).read_text()
    states = {b["name"]: b["state"] for b in client.breakers()}
    assert states == {"model:gpt-4.1": "open", "node:a": "open"}
    with pytest.raises(CircuitOpenError):
        client.chat_completion(msgs, model="gpt-4.1", stream=True)
    assert client.stats()["in_flight"] == 0


def test_a_canned_fallback_reply_reaches_a_stream_caller_as_a_flagged_stream(gateway_factory, make_client):
    from holysheep_lb import CannedStream
    gw = gateway_factory([{"id": "a", "error_rate": 1.0}])
    client = make_client(gw.client_nodes(), max_retries=0,
                         fallback_reply=lambda model, payload, error: {
                             "choices": [{"message": {"role": "assistant", "content": "sorry, try later"}}]})
    with client.chat_completion([{"role": "user", "content": "hi"}], model="gpt-4.1", stream=True) as stream:
        assert isinstance(stream, CannedStream)
        chunks = list(stream)
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["sorry, try later"]
    assert stream.fallback is True and stream.model is None and stream.extra["canned"] is True
    stats = client.stats()
    assert (stats["calls"], stats["successes"], stats["in_flight"]) == (1, 1, 0)
