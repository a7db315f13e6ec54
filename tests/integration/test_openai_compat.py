"""A program written the openai-python way runs on holysheep_lb after changing only its constructor.

``openai_program`` below is what a user has today with ``client = OpenAI(...)``: chat,
a stream, a tool call, embeddings, the models list, a per-call timeout, extra headers,
query and body, and the error code of a 400. It runs unchanged against the simulated
gateway and against a tiny stub server (127.0.0.1) that records what arrived, so the
test can check that the extra headers, query and body reached every request.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List

import pytest

import holysheep_lb
from holysheep_lb import AllAttemptsFailedError, APITimeoutError, BadRequestError, Client, InvalidRequestError
from holysheep_lb.simulator import SimModel, SimNode, SimulatedGateway, reply_text
from holysheep_lb.streaming import CannedStream, ChatStream
from holysheep_lb.types import ChatCompletionChunk

from ..conftest import API_KEY
from .scripted_server import Request, ScriptedServer, http_response

MODEL = "gpt-4.1"
EMBEDDING_MODEL = "text-embedding-3-small"
QUESTION = [{"role": "user", "content": "what is the weather in Oslo"}]
TOO_LONG = [{"role": "user", "content": "LONG " + "word " * 3000}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TRACE = {"X-Trace-Id": "trace-42", "OpenAI-Organization": "org-stub"}
QUERY = {"api-version": "2024-10-21"}
METADATA = {"metadata": {"team": "search"}}


def openai_program(client: Any) -> Dict[str, Any]:
    """Written against openai-python; only the client it is given differs."""
    out: Dict[str, Any] = {}
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0.2, timeout=20.0,
                                          extra_headers=TRACE, extra_query=QUERY, extra_body=METADATA)
    out["text"] = resp.choices[0].message.content
    out["finish_reason"] = resp.choices[0].finish_reason
    out["prompt_tokens"] = resp.usage.prompt_tokens
    out["id"] = resp.id

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, timeout=(5.0, 20.0),
                                            extra_headers=TRACE, extra_query=QUERY, extra_body=METADATA)
    pieces: List[str] = []
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
    out["streamed"] = "".join(pieces)

    tool = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="auto",
                                          extra_headers=TRACE, extra_query=QUERY)
    call = tool.choices[0].message.tool_calls[0]
    out["tool"] = (tool.choices[0].finish_reason, call.type, call.function.name)
    out["tool_args"] = json.loads(call.function.arguments)

    emb = client.embeddings.create(model=EMBEDDING_MODEL, input=["one", "two"], extra_headers=TRACE,
                                   extra_query=QUERY)
    out["vectors"] = [(d.index, len(d.embedding)) for d in emb.data]
    out["models"] = [m.id for m in client.models.list(extra_headers=TRACE, extra_query=QUERY)]

    try:
        client.chat.completions.create(model=MODEL, messages=TOO_LONG, extra_headers=TRACE, extra_query=QUERY)
    except holysheep_lb.BadRequestError as exc:  # was: openai.BadRequestError
        out["error"] = (exc.status_code, exc.code, exc.type, exc.param)
    return out


# -- the simulated gateway ------------------------------------------------------------------


def test_the_openai_program_runs_on_the_simulated_gateway():
    with SimulatedGateway([SimNode("a"), SimNode("b")], seed=3,
                          models={MODEL: SimModel(context_window_tokens=2000)}) as gw:
        with Client(nodes=gw.client_nodes(), api_key=API_KEY, health_check_interval_s=None) as client:
            out = openai_program(client)
    assert out["text"] == out["streamed"] == reply_text(MODEL, QUESTION)
    assert out["finish_reason"] == "stop" and out["prompt_tokens"] > 0 and out["id"].startswith("chatcmpl-")
    assert out["tool"] == ("tool_calls", "function", "get_weather") and set(out["tool_args"]) == {"city"}
    assert [i for i, _ in out["vectors"]] == [0, 1] and all(n > 0 for _, n in out["vectors"])
    assert MODEL in out["models"] and EMBEDDING_MODEL in out["models"]
    assert out["error"] == (400, "context_length_exceeded", "invalid_request_error", "messages")


# -- a stub server that records what arrived -------------------------------------------------


def _json(status: int, body: Any) -> bytes:
    return http_response(status, json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def _chat(message: Dict[str, Any], finish: str) -> Dict[str, Any]:
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}


def _sse(texts: List[str]) -> bytes:
    def chunk(delta: Dict[str, Any], finish: Any = None) -> Dict[str, Any]:
        return {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": t}) for t in texts]
    chunks += [chunk({}, "stop"), {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1,
                                   "model": MODEL, "choices": [],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}]
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return http_response(200, events, headers={"Content-Type": "text/event-stream"})


def stub_answer(request: Request) -> bytes:
    path = request.path.split("?", 1)[0]
    body = json.loads(request.body) if request.body else {}
    if path == "/v1/models":
        return _json(200, {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1, "owned_by": "stub"},
            {"id": EMBEDDING_MODEL, "object": "model", "created": 1, "owned_by": "stub"}]})
    if path == "/v1/embeddings":
        return _json(200, {"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [0.5, -0.5, 0.25]} for i, _ in enumerate(body["input"])],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}})
    if body["messages"][0]["content"].startswith("LONG"):
        return _json(400, {"error": {"message": "This model's maximum context length is 2000 tokens.",
                                     "type": "invalid_request_error", "param": "messages",
                                     "code": "context_length_exceeded"}})
    if body.get("stream"):
        return _sse(["stub ", "answer"])
    if body.get("tools"):
        return _json(200, _chat({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}, "tool_calls"))
    return _json(200, _chat({"role": "assistant", "content": "stub answer"}, "stop"))


def test_the_openai_program_runs_on_a_stub_server_and_every_extra_reaches_it():
    with ScriptedServer(stub_answer) as stub:
        with Client(nodes=[{"id": "stub", "base_url": stub.base_url}], api_key=API_KEY,
                    health_check_interval_s=None) as client:
            out = openai_program(client)
        requests = list(stub.requests)
    assert out["text"] == out["streamed"] == "stub answer" and out["prompt_tokens"] == 7
    assert out["tool"] == ("tool_calls", "function", "get_weather") and out["tool_args"] == {"city": "Oslo"}
    assert out["vectors"] == [(0, 3), (1, 3)] and out["models"] == [MODEL, EMBEDDING_MODEL]
    assert out["error"] == (400, "context_length_exceeded", "invalid_request_error", "messages")

    assert [r.path.split("?")[0] for r in requests] == ["/v1/chat/completions"] * 3 + [
        "/v1/embeddings", "/v1/models", "/v1/chat/completions"]
    for r in requests:  # every call's extra headers and query arrived, next to the client's own
        assert r.headers["x-trace-id"] == "trace-42" and r.headers["openai-organization"] == "org-stub"
        assert r.path.endswith("?api-version=2024-10-21")
        assert r.headers["authorization"] == f"Bearer {API_KEY}"
    chat, streamed, tool = (json.loads(r.body) for r in requests[:3])
    assert chat["metadata"] == streamed["metadata"] == {"team": "search"} and "metadata" not in tool
    assert chat["temperature"] == 0.2 and "timeout" not in chat and "extra_body" not in chat
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert tool["tools"] == TOOLS and tool["tool_choice"] == "auto"
    assert requests[4].method == "GET" and requests[4].body == b""


def test_the_old_spellings_still_work_next_to_the_new_ones():
    with ScriptedServer(stub_answer) as stub:
        with Client(nodes=[{"id": "stub", "base_url": stub.base_url}], api_key=API_KEY,
                    health_check_interval_s=None) as client:
            assert client.embeddings("one", model=EMBEDDING_MODEL).data[0].embedding == [0.5, -0.5, 0.25]
            assert [m.id for m in client.models().data] == [MODEL, EMBEDDING_MODEL]
            assert client.chat_completion(QUESTION, MODEL, extra_headers=TRACE).text == "stub answer"
            page = client.models.list()
            assert isinstance(page, holysheep_lb.Response) and page["object"] == "list" and page.node_id == "stub"
        assert stub.requests[2].headers["x-trace-id"] == "trace-42"
        assert "x-trace-id" not in stub.requests[0].headers  # only the call that asked for it


# -- per-call timeout ------------------------------------------------------------------------


@pytest.fixture
def silent_and_good():
    """Node "silent" reads the request and answers only when released (bounded: 5 s)."""
    release = threading.Event()

    def silent(request: Request) -> bytes:
        release.wait(5.0)
        return stub_answer(request)

    with ScriptedServer(silent) as slow, ScriptedServer(stub_answer) as good:
        try:
            yield slow, good
        finally:
            release.set()


def test_a_per_call_timeout_fails_over_from_a_silent_node(silent_and_good, make_client):
    slow, good = silent_and_good
    client = make_client([{"id": "silent", "base_url": slow.base_url}, {"id": "good", "base_url": good.base_url}],
                         strategy="round_robin", read_timeout_s=60.0)
    started = time.monotonic()
    answers = [client.chat.completions.create(model=MODEL, messages=QUESTION, timeout=0.3) for _ in range(2)]
    assert time.monotonic() - started < 4.0  # the client's own 60 s read timeout would still be waiting
    assert [a.choices[0].message.content for a in answers] == ["stub answer"] * 2
    assert all(a.node_id == "good" for a in answers)
    failed = [t for a in answers for t in a.attempts[:-1]]
    assert failed and all((t.node_id, t.kind) == ("silent", "timeout") for t in failed)


def test_a_stream_waits_for_its_first_chunk_no_longer_than_the_per_call_timeout(silent_and_good, make_client):
    slow, _ = silent_and_good
    client = make_client([{"id": "silent", "base_url": slow.base_url}], max_retries=0)
    started = time.monotonic()
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, timeout=(2.0, 0.3))
    assert time.monotonic() - started < 4.0  # stream_first_chunk_timeout_s is 30 s
    assert isinstance(info.value.last_error, APITimeoutError)


def test_the_call_deadline_bounds_a_longer_per_call_timeout(silent_and_good, make_client):
    slow, _ = silent_and_good
    client = make_client([{"id": "silent", "base_url": slow.base_url}], max_retries=0)
    started = time.monotonic()
    with pytest.raises(AllAttemptsFailedError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, timeout=30.0, deadline_s=0.3)
    assert time.monotonic() - started < 4.0


# -- what is refused before anything is sent ---------------------------------------------------


def test_openai_client_features_and_misspelt_arguments_are_refused_not_sent(make_client):
    with ScriptedServer(stub_answer) as stub:
        client = make_client([{"id": "stub", "base_url": stub.base_url}])
        create = client.chat.completions.create
        cases = [
            (dict(max_retries=5), "max_retries", "Client(max_retries=...)"),
            (dict(with_raw_response=True), "with_raw_response", "not supported"),
            (dict(extra_header={"X-A": "secret-value"}), "extra_header", "did you mean `extra_headers`?"),
            (dict(timeout_s=3), "timeout_s", "did you mean `timeout`?"),
            (dict(extra_headers={"Authorization": "Bearer sk-other"}), "extra_headers['Authorization']",
             "each node is sent its own API key"),
            (dict(extra_body={"model": "other"}), "extra_body['model']", "pass model= as an argument"),
            (dict(timeout=-1), "timeout", "> 0"),
            (dict(timeout=(1, 2, 3)), "timeout", "(connect_s, read_s)"),
        ]
        for kwargs, field, hint in cases:
            with pytest.raises(InvalidRequestError) as info:
                create(model=MODEL, messages=QUESTION, **kwargs)
            assert info.value.field == field and hint in str(info.value), (kwargs, str(info.value))
            assert "secret-value" not in str(info.value) and "sk-other" not in str(info.value)
        with pytest.raises(InvalidRequestError) as info:
            client.embeddings.create(model=EMBEDDING_MODEL, input="x", extra_body={"input": "y"})
        assert info.value.field == "extra_body['input']"
        assert stub.requests == []
        # API parameters the server takes go through, openai-python's or a gateway's own
        create(model=MODEL, messages=QUESTION, n=1, logprobs=True, top_logprobs=2, top_k=5, seed=1)
        sent = json.loads(stub.requests[0].body)
        assert (sent["n"], sent["logprobs"], sent["top_logprobs"], sent["top_k"], sent["seed"]) == (1, True, 2, 5, 1)


def test_a_bad_request_from_the_stub_keeps_its_code_on_the_old_spelling_too(make_client):
    with ScriptedServer(stub_answer) as stub:
        client = make_client([{"id": "stub", "base_url": stub.base_url}])
        with pytest.raises(BadRequestError) as info:
            client.chat_completion(TOO_LONG, MODEL)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_both_stream_kinds_are_what_the_stream_overload_promises(make_client):
    canned = CannedStream({"choices": [{"message": {"content": "sorry"}}]}, latency_ms=1.0, extra={})
    assert isinstance(canned, holysheep_lb.ChatCompletionStream)
    assert [c.choices[0].delta.content for c in canned] == ["sorry"]
    with ScriptedServer(stub_answer) as stub:
        client = make_client([{"id": "stub", "base_url": stub.base_url}])
        with client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True) as stream:
            assert isinstance(stream, holysheep_lb.ChatCompletionStream) and isinstance(stream, ChatStream)
            assert all(isinstance(c, ChatCompletionChunk) for c in stream) and stream.text == "stub answer"


def test_a_cached_answer_is_not_served_to_a_call_with_its_own_headers_or_query(make_client):
    with ScriptedServer(stub_answer) as stub:
        client = make_client([{"id": "stub", "base_url": stub.base_url}], cache=True)
        create = client.chat.completions.create
        for _ in range(2):
            create(model=MODEL, messages=QUESTION, temperature=0)
        assert len(stub.requests) == 1  # the second came from the cache
        assert not create(model=MODEL, messages=QUESTION, temperature=0, extra_headers=TRACE).cached
        assert not create(model=MODEL, messages=QUESTION, temperature=0, extra_query=QUERY).cached
        assert create(model=MODEL, messages=QUESTION, temperature=0, extra_body=METADATA).cached is False
        assert create(model=MODEL, messages=QUESTION, temperature=0, extra_body=METADATA).cached  # body: keyed
        assert create(model=MODEL, messages=QUESTION, temperature=0, extra_headers=TRACE, cache=True).cached
        assert len(stub.requests) == 4
