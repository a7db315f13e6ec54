"""Hypothesis against the transport, the client and the stream parser with hostile answers.

Every answer comes off a real socket on 127.0.0.1 (status line, headers, framing and body
drawn at random): the result is a valid response or a typed error, exactly the right
one when the answer is clean; the health thread probing the same server never dies; no
in-flight slot or counter is left wrong. Example counts are asserted, so a run that
silently tested less fails.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holysheep_lb import Client
from holysheep_lb.config import Node
from holysheep_lb.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    HolySheepError,
    RateLimitError,
    ResponseTooLargeError,
)
from holysheep_lb.health import HealthChecker
from holysheep_lb.streaming import SSEParser, decode_event
from holysheep_lb.transport import HTTPResult, Transport

from ..conftest import FakeClock, wait_until
from .fuzz_strategies import CAP_BYTES, answers, completion, sse_bodies
from .scripted_server import ScriptedServer

# HOLYSHEEP_FUZZ_SCALE=20 runs twenty times as many examples (a longer campaign than CI's)
SCALE = max(1, int(os.environ.get("HOLYSHEEP_FUZZ_SCALE", "1")))
TRANSPORT_EXAMPLES = 500 * SCALE
CLIENT_EXAMPLES = 300 * SCALE
STREAM_EXAMPLES = 200 * SCALE
PARSER_EXAMPLES = 500 * SCALE
FUZZ = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MSGS = [{"role": "user", "content": "fuzz"}]
TIMEOUT = (2.0, 2.0)


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as srv:
        yield srv


def _assert_exact_outcome(answer, outcome) -> None:
    """A clean or truncated answer has one right outcome; any other only a typed one."""
    if isinstance(outcome, HTTPResult):
        assert 200 <= outcome.status_code < 300 and isinstance(outcome.data, dict)
    else:
        assert isinstance(outcome, APIError), repr(outcome)
    if answer.truncated:
        expected = ResponseTooLargeError if len(answer.body) > CAP_BYTES else APIConnectionError
        assert isinstance(outcome, (expected, ResponseTooLargeError)), (answer.framing, repr(outcome))
        return
    if not answer.clean:
        return
    if len(answer.body) > CAP_BYTES:
        assert isinstance(outcome, ResponseTooLargeError), repr(outcome)
    elif answer.status >= 300:
        assert isinstance(outcome, APIStatusError) and outcome.status_code == answer.status, repr(outcome)
        if isinstance(outcome, RateLimitError) and outcome.retry_after_s is not None:
            assert 0 <= outcome.retry_after_s < float("inf")
    elif answer.json_object() is not None:
        assert isinstance(outcome, HTTPResult) and outcome.data == answer.json_object(), repr(outcome)
    else:
        assert isinstance(outcome, APIResponseValidationError), repr(outcome)
        assert not isinstance(outcome, ResponseTooLargeError)


def test_transport_gives_a_valid_result_or_the_right_typed_error(server):
    transport = Transport(Node(id="f", base_url=server.base_url), api_key="sk-fuzz", pool_maxsize=2,
                          max_response_bytes=CAP_BYTES)
    examples = []

    @settings(max_examples=TRANSPORT_EXAMPLES, **FUZZ)
    @given(answer=answers())
    def check(answer):
        examples.append(answer.body_kind)
        server.script = answer.wire
        try:
            outcome = transport.send("POST", "/chat/completions", body=b"{}", headers=None, timeout_s=TIMEOUT)
        except APIError as exc:
            outcome = exc
        _assert_exact_outcome(answer, outcome)

    try:
        check()
    finally:
        transport.close()
    assert len(examples) >= TRANSPORT_EXAMPLES
    assert {"completion", "huge", "deep", "non_utf8", "array", "no_choices", "truncated_json"} <= set(examples)


def _healthy_answer(stream: bool) -> bytes:
    if stream:
        body = (b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')
        kind = b"text/event-stream"
    else:
        body, kind = json.dumps(completion("ok")).encode(), b"application/json"
    return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        kind, len(body), body)


def test_client_and_health_thread_survive_fuzzed_answers_with_state_intact(server):
    clock = FakeClock()
    # one long-lived client: state shared across every example must stay consistent
    client = Client(api_key="sk-fuzz", nodes=[{"id": "f", "base_url": server.base_url}], clock=clock,
                    sleep=clock.sleep, max_retries=0, breaker=None, retry_budget_ratio=None,
                    retry_after_cap_s=0, max_response_bytes=CAP_BYTES, connect_timeout_s=2.0,
                    read_timeout_s=2.0, stream_first_chunk_timeout_s=2.0, stream_stall_timeout_s=2.0,
                    health_check_interval_s=0.01, health_check_timeout_s=2.0)
    probe = HealthChecker(client.selector, interval_s=1.0, timeout_s=2.0, unhealthy_threshold=1,
                          healthy_threshold=1)
    seen = {"calls": 0, "ok": 0, "typed": 0, "attempts": 0, "probes_ok": 0, "streams": 0}

    @settings(max_examples=CLIENT_EXAMPLES, **FUZZ)
    @given(stream=st.booleans(), healthy=st.booleans(), data=st.data())
    def check(stream, healthy, data):
        # a healthy answer between hostile ones must still succeed: nothing was left broken
        answer = None if healthy else data.draw(answers(stream=stream))
        server.script = answer.wire if answer else _healthy_answer(stream)
        clock.advance(1.0)  # past a 429's default 1 s throttle (retry_after_cap_s=0 caps the rest)
        seen["calls"] += 1
        seen["streams"] += stream
        handle = None
        try:
            if stream:
                handle = client.chat_completion(MSGS, model="m", stream=True)
                with handle:
                    assert isinstance(handle.read_text(), str)
            else:
                handle = client.chat_completion(MSGS, model="m")
                assert isinstance(handle, dict) and handle.node_id == "f"
            seen["ok"] += 1
        except HolySheepError as exc:
            assert answer is not None, f"a healthy answer failed after hostile ones: {exc!r}"
            seen["typed"] += 1
            handle = handle if handle is not None else exc
        seen["attempts"] += len(getattr(handle, "attempts", ()))
        assert client.stats()["in_flight"] == 0
        seen["probes_ok"] += probe.probe(client.selector.nodes[0])  # never raises

    try:
        check()
        stats = client.stats()
        checker = client.health_checker
        assert checker is not None and checker.running and checker.loop_errors == 0
        assert client.nodes()[0]["last_probe_ago_s"] is not None
    finally:
        client.close()
    assert seen["calls"] >= CLIENT_EXAMPLES and 0 < seen["streams"] < seen["calls"]
    assert seen["ok"] > 0 and seen["typed"] > 0 and seen["ok"] + seen["typed"] == seen["calls"]
    assert (stats["calls"], stats["successes"], stats["failures"]) == (seen["calls"], seen["ok"], seen["typed"])
    node = stats["nodes"]["f"]
    assert node["requests"] == seen["attempts"] == seen["calls"]  # max_retries=0: one attempt per call
    assert node["requests"] == node["successes"] + sum(node["failures"].values())
    assert stats["in_flight"] == 0 and client.nodes()[0]["awaiting"] == 0
    assert wait_until(lambda: not checker.running, 3.0)


def test_a_clean_event_stream_always_gives_its_text(server):
    client = Client(api_key="sk-fuzz", nodes=[{"id": "f", "base_url": server.base_url}], max_retries=0,
                    breaker=None, health_check_interval_s=None, max_response_bytes=CAP_BYTES)
    counted = []

    @settings(max_examples=STREAM_EXAMPLES, **FUZZ)
    @given(sse=sse_bodies(), framing=st.sampled_from(["length", "chunked", "close"]))
    def check(sse, framing):
        kind, body, expected = sse
        counted.append(kind)
        length = f"Content-Length: {len(body)}\r\n" if framing == "length" else ""
        if framing == "chunked":
            length, body = "Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        server.script = (f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{length}Connection: close\r\n\r\n"
                         .encode() + body)
        try:
            with client.chat_completion(MSGS, model="m", stream=True) as stream:
                text = stream.read_text()
        except HolySheepError as exc:
            assert expected is None, f"clean stream {kind!r} failed: {exc!r}"
        else:
            assert expected is None or text == expected
        assert client.stats()["in_flight"] == 0

    try:
        check()
        streams = client.stats()["streams"]
    finally:
        client.close()
    assert len(counted) >= STREAM_EXAMPLES and "sse" in counted
    assert streams["cancelled"] == 0


@st.composite
def _split(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def _parse(pieces, max_bytes=1 << 20):
    parser = SSEParser(node_id="f", max_bytes=max_bytes)
    events, failed = [], False
    for piece in pieces:
        try:
            events += parser.feed(piece)
        except ResponseTooLargeError:
            raise
        except APIResponseValidationError:
            failed = True
            break
    return events, failed or parser.error is not None


def test_sse_parser_is_typed_and_independent_of_chunk_boundaries():
    counted = []

    @settings(max_examples=PARSER_EXAMPLES, **FUZZ)
    @given(data=st.data())
    def check(data):
        _, body, expected = data.draw(sse_bodies())
        noise = data.draw(st.binary(max_size=40))
        body = body + noise if data.draw(st.booleans()) else body
        counted.append(1)
        whole = _parse([body])
        assert _parse(data.draw(_split(body))) == whole
        events, failed = whole
        decoded = []
        for event in events:
            try:
                chunk = decode_event(event, "f")
            except (APIStatusError, APIResponseValidationError):
                continue
            assert chunk is None or isinstance(chunk, dict)
            if chunk is not None:
                decoded.append(chunk)
        if expected is not None and not noise:
            assert not failed
            assert "".join(c["choices"][0]["delta"]["content"] for c in decoded) == expected
        if not failed:  # (after garbage, the parser reports that first)
            with pytest.raises(ResponseTooLargeError):  # the size cap holds whatever the content
                _parse([body, b"x" * 64], max_bytes=len(body) + 32)

    check()
    assert len(counted) >= PARSER_EXAMPLES


def test_fuzzed_json_bodies_are_recorded_as_typed_attempts(server):
    """A 2xx that is not a JSON object fails over exactly like a 5xx: json array, scalar, junk."""
    client = Client(api_key="sk-fuzz", nodes=[{"id": "f", "base_url": server.base_url}], max_retries=0,
                    breaker=None, health_check_interval_s=None)
    try:
        for body in (b"[1, 2]", b"42", b"\xff\xfe", json.dumps({"id": "no choices"}).encode()):
            server.script = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                len(body), body)
            try:
                resp = client.chat_completion(MSGS, model="m")
            except HolySheepError as exc:
                assert isinstance(exc.__cause__, APIResponseValidationError)
                assert exc.attempts[0].kind == "invalid_response"
            else:  # a JSON object without choices is passed through: resp.text says there is none
                assert resp.text is None and resp["id"] == "no choices"
    finally:
        client.close()
