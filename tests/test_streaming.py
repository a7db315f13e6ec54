"""SSE parsing and stream behaviour against mocked HTTP (responses) and fake clocks."""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
from decimal import Decimal

import pytest
import responses

from holysheep_lb import (
    AllAttemptsFailedError,
    APIResponseValidationError,
    APITimeoutError,
    BadRequestError,
    ChatStream,
    ConfigError,
    InternalServerError,
    InvalidRequestError,
    ResponseTooLargeError,
    StreamInterruptedError,
)
from holysheep_lb.streaming import SSEEvent, SSEParser, StreamReaper, _EventReader, decode_event
from holysheep_lb.transport import Transport

A = "https://a.example/v1"
B = "https://b.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}]
MSGS = [{"role": "user", "content": "hello"}]


def sse(*payloads, done=True, comment=False):
    """An event-stream body: each payload a dict (JSON-encoded) or raw str."""
    parts = []
    if comment:
        parts.append(b": keepalive\n\n")
    for p in payloads:
        data = p if isinstance(p, str) else json.dumps(p)
        parts.append(f"data: {data}\n\n".encode())
    if done:
        parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def delta(text, index=0):
    return {"object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
GOOD = sse({"object": "chat.completion.chunk", "model": "m-2024",
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}], "usage": None},
           delta("Hel"), delta("lo"),
           {"object": "chat.completion.chunk", "model": "m", "choices": [
               {"index": 0, "delta": {}, "finish_reason": "stop"}]},
           {"object": "chat.completion.chunk", "model": "m", "choices": [], "usage": USAGE}, comment=True)


# ------------------------------------------------------------------------ parser


def feed_all(parser, data, step=None):
    events = []
    if step is None:
        return parser.feed(data)
    for i in range(0, len(data), step):
        events.extend(parser.feed(data[i:i + step]))
    return events


def test_parser_skips_comments_ids_and_joins_multiline_data():
    body = (b"\xef\xbb\xbf: keepalive\n\nid: 7\nretry: 100\nevent: message\ndata: {\"a\":\ndata: 1}\n\n"
            b"\n\ndata:[DONE]\r\n\r\n")
    events = SSEParser().feed(body)
    assert events == [SSEEvent("message", '{"a":\n1}'), SSEEvent(None, "[DONE]")]
    assert decode_event(events[0]) == {"a": 1}
    assert decode_event(events[1]) is None


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_parser_gives_the_same_events_whatever_the_chunk_boundaries(step):
    assert feed_all(SSEParser(), GOOD, step) == SSEParser().feed(GOOD)
    assert len(SSEParser().feed(GOOD)) == 6  # 5 chunks and [DONE]; the keepalive is skipped


@pytest.mark.parametrize("step", [1, 2, 4])
def test_a_byte_order_mark_is_skipped_even_when_split_over_reads(step):
    # found by fuzzing: a BOM cut by the first read made the first line "not an SSE field"
    assert feed_all(SSEParser(), b"\xef\xbb\xbf" + GOOD, step) == SSEParser().feed(GOOD)


def test_parser_holds_an_incomplete_event_until_its_blank_line():
    parser = SSEParser()
    assert parser.feed(b"data: {}\n") == []
    assert parser.feed(b"\n") == [SSEEvent(None, "{}")]


@pytest.mark.parametrize("line", [b"<html>502 Bad Gateway</html>\n", b'{"choices": []}\n', b"dat: x\n",
                                  b"data: \xff\xfe\n"])
def test_parser_rejects_garbage_with_a_typed_error(line):
    with pytest.raises(APIResponseValidationError, match="malformed SSE line") as info:
        SSEParser(node_id="n1").feed(line)
    assert info.value.node_id == "n1"


def test_parser_returns_the_events_before_garbage_and_raises_on_the_next_feed():
    parser = SSEParser()
    assert parser.feed(b"data: {}\n\nevent: x\n<html>\ndata: {}\n\n") == [SSEEvent(None, "{}")]
    assert isinstance(parser.error, APIResponseValidationError)
    with pytest.raises(APIResponseValidationError, match="<html>"):
        parser.feed(b"data: {}\n\n")


def test_parser_caps_the_total_size():
    parser = SSEParser(max_bytes=10)
    parser.feed(b"data: 1234")
    with pytest.raises(ResponseTooLargeError):
        parser.feed(b"5")


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"text"'])
def test_decode_rejects_data_that_is_not_a_json_object(data):
    with pytest.raises(APIResponseValidationError, match="malformed SSE data"):
        decode_event(SSEEvent(None, data), "n1")


def test_decode_turns_an_error_event_into_a_status_error():
    with pytest.raises(InternalServerError, match="overloaded"):
        decode_event(SSEEvent(None, '{"error": {"message": "overloaded", "type": "server_error"}}'))
    with pytest.raises(BadRequestError):
        decode_event(SSEEvent("error", '{"error": {"message": "bad", "code": 400}}'))


def test_reader_times_out_when_only_keepalives_arrive(clock):
    def keepalives():
        while True:
            clock.advance(1.0)
            yield b": ping\n\n"

    reader = _EventReader(keepalives(), SSEParser(node_id="n1"), clock)
    reader.expect("chunk", 2.5)
    start = clock.now
    with pytest.raises(APITimeoutError, match="no chunk within 2.5 s") as info:
        reader.next_event()
    assert clock.now - start == 3.0 and info.value.node_id == "n1"


# ------------------------------------------------------------------ client streams


def _client(make_client, clock, **kw):
    return make_client(NODES, clock=clock, sleep=clock.sleep, rand=lambda: 0.5, strategy="round_robin", **kw)


def _stream_post(rsps, url, body=GOOD, status=200, **kw):
    rsps.post(url + "/chat/completions", body=body, status=status, content_type="text/event-stream", **kw)


def test_stream_yields_chunks_text_usage_and_sends_include_usage(rsps, make_client, clock):
    _stream_post(rsps, A, headers={"x-request-id": "req_9"})
    client = _client(make_client, clock)
    stream = client.chat.completions.create(model="m", messages=MSGS, stream=True, temperature=0)
    assert isinstance(stream, ChatStream)
    chunks = list(stream)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:4]] == [None, "Hel", "lo", None]
    assert chunks[4] == {"object": "chat.completion.chunk", "model": "m", "choices": [], "usage": USAGE}
    assert (stream.text, stream.usage, stream.finish_reason, stream.request_id) == ("Hello", USAGE, "stop", "req_9")
    assert (stream.state, stream.chunks, stream.node_id) == ("completed", 5, "a")
    sent = rsps.calls[0].request
    assert json.loads(sent.body) == {"model": "m", "messages": MSGS, "stream": True, "temperature": 0,
                                     "stream_options": {"include_usage": True}}
    assert sent.headers["Accept"] == "text/event-stream"
    assert client.stats()["in_flight"] == 0


@pytest.mark.parametrize("name", ["stream_first_chunk_timeout_s", "stream_stall_timeout_s"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), "5"])
def test_stream_timeouts_are_validated(make_client, name, value):
    with pytest.raises(ConfigError, match=name):
        make_client(NODES, **{name: value})


def test_caller_may_turn_include_usage_off_and_bad_stream_args_are_rejected(rsps, make_client, clock):
    _stream_post(rsps, A)
    client = _client(make_client, clock)
    client.chat_completion(MSGS, model="m", stream=True, stream_options={"include_usage": False}).close()
    assert json.loads(rsps.calls[0].request.body)["stream_options"] == {"include_usage": False}
    with pytest.raises(InvalidRequestError, match="stream"):
        client.chat_completion(MSGS, model="m", stream="yes")
    with pytest.raises(InvalidRequestError, match="stream_options"):
        client.chat_completion(MSGS, model="m", stream=True, stream_options=["include_usage"])


@pytest.mark.parametrize("first_body,status", [
    (b"", 503),
    (b'{"error": {"message": "slow down"}}', 429),
    (b"<html>oops</html>\n", 200),
    (sse({"error": {"message": "overloaded"}}), 200),
    (b"", 200),  # ends before any chunk
])
def test_failures_before_the_first_chunk_fail_over(rsps, make_client, clock, first_body, status):
    _stream_post(rsps, A, body=first_body, status=status)
    _stream_post(rsps, B)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello"
    assert stream.node_id == "b"
    assert [(a.node_id, a.ok) for a in stream.attempts] == [("a", False), ("b", True)]
    assert clock.sleeps == [0.025]  # full-jitter backoff: 0.05 * rand 0.5
    assert client.stats()["in_flight"] == 0


def test_a_json_document_answering_a_stream_is_an_invalid_response_and_fails_over(rsps, make_client, clock):
    # a node that ignored "stream": true; before, this read as "ended before its first chunk"
    rsps.post(A + "/chat/completions", json={"choices": [{"message": {"content": "hi"}}]})
    _stream_post(rsps, B)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello"
    failed = stream.attempts[0]
    assert (failed.node_id, failed.kind) == ("a", "invalid_response")
    assert "expected text/event-stream, got a application/json document" in failed.error


def test_a_final_error_before_the_first_chunk_is_raised_at_once(rsps, make_client, clock):
    _stream_post(rsps, A, body=b'{"error": {"message": "bad model"}}', status=400)
    client = _client(make_client, clock)
    with pytest.raises(BadRequestError, match="bad model"):
        client.chat_completion(MSGS, model="m", stream=True)
    assert len(rsps.calls) == 1 and client.stats()["in_flight"] == 0


def test_every_node_failing_before_the_first_chunk_lists_the_attempts(rsps, make_client, clock):
    _stream_post(rsps, A, body=b"", status=502)
    _stream_post(rsps, B, body=b"", status=502)
    client = _client(make_client, clock, max_retries=1)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m", stream=True)
    assert [a.node_id for a in info.value.attempts] == ["a", "b"]
    assert client.stats()["failures_by_error"] == {"AllAttemptsFailedError": 1}


@pytest.mark.parametrize("tail,reason,cause", [
    (b"data: {broken\n\n" * 9, "malformed", APIResponseValidationError),  # one more than may be skipped
    (b"event: x\n<html>\n", "malformed", APIResponseValidationError),
    (b"", "truncated", None),
    (sse({"error": {"message": "upstream died"}}, done=False), "server_error", InternalServerError),
])
def test_a_broken_stream_after_the_first_chunk_is_interrupted_not_retried(rsps, make_client, clock, tail,
                                                                           reason, cause):
    _stream_post(rsps, A, body=sse(delta("Hel"), delta("lo"), done=False) + tail)
    _stream_post(rsps, B)
    client = _client(make_client, clock, stream_rescue="off")
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    err = info.value
    assert (err.reason, err.partial_text, err.chunks, err.node_id) == (reason, "Hello", 2, "a")
    assert not err.retryable
    if cause is not None:
        assert isinstance(err.__cause__, cause)
    assert len(rsps.calls) == 1  # never retried
    assert list(stream) == [] and stream.state == "interrupted"
    stats = client.stats()
    assert stats["in_flight"] == 0
    assert stats["streams"]["interrupted_by_reason"] == {reason: 1}
    assert stats["failures_by_error"] == {"StreamInterruptedError": 1}


def test_stall_timeout_counts_only_time_spent_waiting_for_the_node(rsps, make_client, clock, monkeypatch):
    _stream_post(rsps, A)
    pieces = [sse(delta("Hel"), done=False), b": keepalive\n\n", sse(delta("lo"), done=False),
              b": keepalive\n\n", b": keepalive\n\n"]

    def iter_bytes(self, response):
        for piece in pieces:
            yield piece
            clock.advance(2.0)  # the node takes 2 s per piece

    monkeypatch.setattr(Transport, "iter_bytes", iter_bytes)
    client = _client(make_client, clock, stream_stall_timeout_s=3.0, stream_rescue="off")
    stream = client.chat_completion(MSGS, model="m", stream=True)
    clock.advance(100.0)  # a slow caller: not the node's fault
    assert next(stream)["choices"][0]["delta"]["content"] == "Hel"
    assert next(stream)["choices"][0]["delta"]["content"] == "lo"  # after a keepalive, 4 s after asking
    with pytest.raises(StreamInterruptedError) as info:
        next(stream)  # two keepalives and no chunk: 4 s > 3 s
    assert info.value.reason == "stall" and info.value.partial_text == "Hello"


def test_close_and_context_manager_release_the_node_once(rsps, make_client, clock):
    _stream_post(rsps, A)
    _stream_post(rsps, B)
    client = _client(make_client, clock)
    with client.chat_completion(MSGS, model="m", stream=True) as stream:
        assert client.stats()["in_flight"] == 1
        next(stream)
    assert stream.state == "closed" and client.stats()["in_flight"] == 0
    stream.close()  # idempotent
    other = client.chat_completion(MSGS, model="m", stream=True)
    other.close()
    assert list(other) == []
    stats = client.stats()
    assert (stats["in_flight"], stats["streams"]["cancelled"], stats["successes"]) == (0, 2, 2)
    assert [n["successes"] for n in stats["nodes"].values()] == [0, 0]  # cancelled: no outcome recorded


def test_a_dropped_stream_is_released_by_the_next_call_not_by_the_gc(rsps, make_client, clock):
    _stream_post(rsps, A)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    next(stream)
    ended = []
    original = client._stream_ended
    stream._lease._on_end = lambda outcome: (ended.append(outcome), original(outcome))
    del stream  # refcount drop: the finalizer only queues the lease
    assert client.selector.nodes[0].in_flight == 1 and ended == []
    assert client.stats()["in_flight"] == 0  # reaped here
    assert [(o.status, o.chunks, o.node_id) for o in ended] == [("cancelled", 1, "a")]
    assert client.stats()["streams"]["cancelled"] == 1


def test_reaper_settles_each_lease_once():
    settled = []

    class Lease:
        node = type("N", (), {"id": "n"})()
        abandoned_at = None

        def settle(self, status):
            settled.append(status)
            return len(settled) == 1

    reaper = StreamReaper(lambda: 5.0)
    lease = Lease()
    reaper.adopt(lease)
    reaper.adopt(lease)
    assert reaper.reap() == 1 and settled == ["cancelled", "cancelled"] and lease.abandoned_at == 5.0


def test_stream_end_hook_gets_model_and_usage_once(rsps, make_client, clock):
    _stream_post(rsps, A)
    client = _client(make_client, clock)
    seen = []
    original = client._stream_ended
    client._stream_ended = lambda outcome: (seen.append(outcome), original(outcome))
    stream = client.chat_completion(MSGS, model="m", stream=True)
    stream.read_text()
    stream.close()
    assert [(o.model, o.usage, o.status) for o in seen] == [("m", USAGE, "completed")]
    assert client.stats()["streams"]["usage"] == USAGE


# ----------------------------------------------- close-delimited stream on loopback


def test_close_delimited_stream_delivers_the_first_chunk_before_the_body_ends(make_client):
    """A server without chunked encoding: the first chunk must not wait for a full buffer."""
    release = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5.0)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                         + sse(delta("Hel"), done=False))
            release.wait(5.0)
            conn.sendall(sse(delta("lo")))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        client = make_client([{"id": "a", "base_url": f"http://127.0.0.1:{listener.getsockname()[1]}/v1"}],
                             stream_first_chunk_timeout_s=3.0)
        stream = client.chat_completion(MSGS, model="m", stream=True)
        assert not release.is_set() and stream.text == "Hel"
        release.set()
        assert stream.read_text() == "Hello"
    finally:
        release.set()
        server.join(5.0)
        listener.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_parents_stream_dropped_in_a_forked_child_does_not_skew_the_childs_counts(rsps, make_client, clock):
    _stream_post(rsps, A)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    pid = os.fork()
    if pid == 0:  # child: the parent's pick is not the child's to release
        code = 1
        try:
            del stream
            gc.collect()
            stats = client.stats()
            code = 0 if (stats["in_flight"], stats["streams"]["cancelled"]) == (0, 0) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert client.stats()["in_flight"] == 1  # the parent still holds its stream
    stream.close()
    assert client.stats()["in_flight"] == 0


def _gpt_down_others_stream(rsps):
    """Every node answers gpt-4.1 with 503 and streams GOOD for any other model."""
    def by_model(request):
        model = json.loads(request.body)["model"]
        if model == "gpt-4.1":
            return (503, {}, b'{"error": {"message": "overloaded"}}')
        return (200, {"Content-Type": "text/event-stream"}, GOOD)

    for url in (A, B):
        rsps.add_callback(responses.POST, url + "/chat/completions", callback=by_model)


def test_stream_falls_back_to_the_next_model_and_is_flagged(rsps, make_client, clock):
    _gpt_down_others_stream(rsps)
    client = _client(make_client, clock, fallbacks={"gpt-4.1": ["gemini-2.5-flash"]}, max_retries=1)
    stream = client.chat_completion(MSGS, model="gpt-4.1", stream=True)
    assert stream.read_text() == "Hello"
    # the answering model is the one the server names in its chunks ("m" here)
    assert (stream.model, stream.fallback, stream.extra["requested_model"]) == ("m", True, "gpt-4.1")
    sent = [json.loads(c.request.body)["model"] for c in rsps.calls]
    assert sent == ["gpt-4.1", "gpt-4.1", "gemini-2.5-flash"]
    keys = [c.request.headers["Idempotency-Key"] for c in rsps.calls]
    assert keys[0] == keys[1] != keys[2]  # one key per model, stable across its attempts
    assert client.stats()["in_flight"] == 0


# ------------------------------------------------------------------ stream costs


def test_a_fallback_stream_is_paid_as_the_model_that_streamed(rsps, make_client, clock):
    _gpt_down_others_stream(rsps)
    client = _client(make_client, clock, fallbacks={"gpt-4.1": ["gemini-2.5-flash"]}, max_retries=0)
    stream = client.chat_completion(MSGS, model="gpt-4.1", stream=True)
    assert client.ledger.store.reserved_usd() == Decimal(6 * 30 + 256 * 250) / 100_000_000  # gemini's estimate
    assert stream.read_text() == "Hello"
    report = client.cost_report()
    assert list(report["by_model"]) == ["gemini-2.5-flash"]
    assert report["totals"]["cost_usd"] == 0.0000071  # 7*0.30 + 2*2.50 micro-USD
    assert report["in_flight_reserved_usd"] == 0.0


def test_a_streams_token_rate_reservation_is_settled_from_its_usage(rsps, make_client, clock):
    _stream_post(rsps, A)
    client = _client(make_client, clock, tokens_per_minute=600, rate_limit_burst_s=30)  # a burst of 300
    stream = client.chat_completion(MSGS, model="m", stream=True, max_tokens=100)
    assert client.stats()["rate_limits"]["tokens"]["available"] == 300 - 106  # 6 prompt + 100 estimated
    stream.read_text()
    assert client.stats()["rate_limits"]["tokens"]["available"] == 300 - 9  # USAGE total_tokens


def test_a_stream_that_ends_as_it_opens_is_settled_once(rsps, make_client, clock):
    _stream_post(rsps, A, body=sse())  # nothing but [DONE]: the stream ends before it is returned
    client = _client(make_client, clock, tokens_per_minute=600, rate_limit_burst_s=30)  # a burst of 300
    stream = client.chat_completion(MSGS, model="gpt-4.1", stream=True, max_tokens=100)
    assert stream.state == "completed" and stream.read_text() == ""
    report = client.cost_report()
    assert report["totals"]["requests"] == 1 and report["totals"]["output_tokens"] == 100  # the estimate
    assert report["in_flight_reserved_usd"] == 0.0
    assert client.stats()["rate_limits"]["tokens"]["available"] == 300 - 106  # no usage: the estimate stays


# ------------------------------------------------------------ dropped streams without the GC


@pytest.fixture
def no_gc():
    """Reference counting only: whatever a cycle holds stays held."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _held(client):
    """What a call holds until its stream ends: in-flight picks, spend reservations, breaker trials."""
    stats = client.stats()  # reaps dropped streams first
    trials = sum(b["trials_in_flight"] for b in client.breakers())
    return stats["in_flight"], client.ledger.store.reserved_usd(), trials


def _scripted(rsps, plan):
    """Each node answers from its own list of (status, body), the last one repeating."""
    def reply(node_id):
        def answer(request):
            queue = plan[node_id]
            status, body = queue.pop(0) if len(queue) > 1 else queue[0]
            content_type = "text/event-stream" if status == 200 else "application/json"
            return status, {"Content-Type": content_type}, body
        return answer
    for node_id, url in (("a", A), ("b", B)):
        rsps.add_callback(responses.POST, url + "/chat/completions", callback=reply(node_id))


FAIL = (500, b'{"error": {"message": "boom"}}')
STREAM = (200, GOOD)


def test_a_dropped_stream_whose_call_had_a_failed_attempt_is_released_without_the_gc(rsps, make_client, clock,
                                                                                         no_gc):
    _scripted(rsps, {"a": [FAIL], "b": [STREAM]})
    client = _client(make_client, clock, node_breakers={"fail_max": 5})
    for _ in range(3):
        stream = client.chat_completion(MSGS, model="gpt-4.1", stream=True)
        assert [a.ok for a in stream.attempts] == [False, True]
        next(stream)
        del stream
        assert _held(client) == (0, Decimal(0), 0)
    assert client.stats()["streams"]["cancelled"] == 3


def test_a_dropped_stream_answered_by_a_fallback_model_is_released_without_the_gc(rsps, make_client, clock, no_gc):
    _gpt_down_others_stream(rsps)
    client = _client(make_client, clock, fallbacks={"gpt-4.1": ["gemini-2.5-flash"]}, max_retries=1)
    stream = client.chat_completion(MSGS, model="gpt-4.1", stream=True)
    next(stream)
    del stream
    assert _held(client) == (0, Decimal(0), 0)


def test_a_dropped_half_open_trial_stream_does_not_keep_the_model_refusing(rsps, make_client, clock, no_gc):
    _scripted(rsps, {"a": [FAIL, STREAM], "b": [FAIL, STREAM]})
    client = _client(make_client, clock, max_retries=1, breaker={"fail_max": 1, "reset_timeout_s": 10})
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="gpt-4.1", stream=True)  # a, b fail: the breaker opens
    clock.advance(11)
    trial = client.chat_completion(MSGS, model="gpt-4.1", stream=True)  # the trial: one attempt, it streams
    assert [a.ok for a in trial.attempts] == [True]
    next(trial)
    del trial
    assert _held(client) == (0, Decimal(0), 0)
    client.chat_completion(MSGS, model="gpt-4.1", stream=True).close()  # no CircuitOpenError
