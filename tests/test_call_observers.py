"""Observers see every call: started, each attempt, decisions, first chunk, ended."""

from __future__ import annotations

import json
from typing import Any, List

import pytest

from holysheep_lb import ConfigError
from holysheep_lb.observe import CallObserver

from .conftest import chat_body

A, B = "https://a.example/v1", "https://b.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}]
MSGS = [{"role": "user", "content": "hi"}]
PRICES = {"m": (1.0, 1.0), "m2": (1.0, 1.0)}


class Recording(CallObserver):
    def __init__(self) -> None:
        self.events: List[Any] = []
        self.ends: List[Any] = []

    def call_started(self, call):
        self.events.append(("started", call.operation, call.model))

    def attempt_ended(self, call, attempt):
        self.events.append(("attempt", attempt.node_id, attempt.outcome))

    def decided(self, call, decision):
        self.events.append(("decided", decision.kind))

    def first_chunk(self, call, at):
        self.events.append(("first_chunk",))

    def call_ended(self, call, end):
        self.events.append(("ended", end.error is None))
        self.ends.append(end)


class Broken(CallObserver):
    def call_started(self, call):
        raise RuntimeError("telemetry bug")


def test_a_success_is_started_attempted_and_ended(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json=chat_body("m", 5, 2))
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    client.chat_completion(MSGS, model="m")
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "ok"), ("ended", True)]
    end = rec.ends[0]
    assert (end.node_id, end.response_model, end.response_id, end.input_tokens, end.output_tokens) == (
        "a", "m", "x", 5, 2)


def test_a_failover_shows_each_attempt(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    rsps.post(B + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES, observers=[rec], prices=PRICES, strategy="round_robin")
    client.chat_completion(MSGS, model="m")
    attempts = [e for e in rec.events if e[0] == "attempt"]
    assert attempts in ([("attempt", "a", "status_5xx"), ("attempt", "b", "ok")], [("attempt", "b", "ok")])
    assert rec.events[0][0] == "started" and rec.events[-1] == ("ended", True)


def test_a_fallback_is_a_decision(rsps, make_client):
    rec = Recording()

    def by_model(request):
        model = json.loads(request.body)["model"]
        if model == "m":
            return 503, {}, json.dumps({"error": {"message": "down"}})
        return 200, {}, json.dumps(chat_body("m2"))

    import responses
    rsps.add_callback(responses.POST, A + "/chat/completions", callback=by_model)
    client = make_client(NODES[:1], observers=[rec], prices=PRICES, fallbacks={"m": ["m2"]}, max_retries=0)
    resp = client.chat_completion(MSGS, model="m")
    assert resp.fallback
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "status_5xx"), ("decided", "fallback"),
                          ("attempt", "a", "ok"), ("ended", True)]


def test_a_cache_hit_is_a_decision_without_attempts(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES[:1], prices=PRICES, cache={"ttl_s": 60})
    client.chat_completion(MSGS, model="m", temperature=0)
    client.add_observer(rec)
    assert client.chat_completion(MSGS, model="m", temperature=0).cached
    assert rec.events == [("started", "chat", "m"), ("decided", "cache_hit"), ("ended", True)]
    assert rec.ends[0].cached


def test_a_streams_call_ends_when_the_stream_ends(rsps, make_client):
    rec = Recording()
    chunks = [{"object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
              {"object": "chat.completion.chunk", "model": "m", "choices": [],
               "usage": {"prompt_tokens": 4, "completion_tokens": 1}}]
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    rsps.post(A + "/chat/completions", body=body, content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "ok"), ("first_chunk",)]
    assert stream.read_text() == "Hi"
    assert rec.events[-1] == ("ended", True)
    assert (rec.ends[0].input_tokens, rec.ends[0].output_tokens, rec.ends[0].node_id) == (4, 1, "a")


def test_an_observer_that_raises_never_breaks_a_call_and_is_counted(rsps, make_client):
    rsps.post(A + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES[:1], observers=[Broken()], prices=PRICES)
    assert client.chat_completion(MSGS, model="m")["model"] == "m"
    assert client.stats()["observer_errors"] == 1


def test_observers_are_validated(make_client):
    with pytest.raises(ConfigError, match="observers"):
        make_client(NODES[:1], observers=[object()])
    with pytest.raises(ConfigError, match="observer"):
        make_client(NODES[:1]).add_observer(print)  # type: ignore[arg-type]
