"""The simulated gateway answers in the shapes openai-python parses: tool calls, embeddings, usage."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import requests

from holysheep_lb.simulator import SimNode, SimulatedGateway, reply_text

from .sim_helpers import MESSAGES, TIMEOUT, body, chat_url, parse, read_stream

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def gw():
    with SimulatedGateway([SimNode("a"), SimNode("b")], seed=1) as gateway:
        yield gateway


def test_a_request_with_tools_is_answered_with_a_tool_call(gw):
    answers = [requests.post(chat_url(gw, n), json=body("gpt-4.1", tools=TOOLS), timeout=TIMEOUT).json()
               for n in ("a", "b")]
    choice = answers[0]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "one two three four five six seven eight"}
    usage = answers[0]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 0
    assert answers[1]["choices"] == answers[0]["choices"]  # deterministic: a failed-over call gets the same call


def test_tool_choice_picks_the_function(gw):
    named = {"type": "function", "function": {"name": "get_time"}}
    call = requests.post(chat_url(gw), json=body("gpt-4.1", tools=TOOLS, tool_choice=named),
                         timeout=TIMEOUT).json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_time", "arguments": "{}"}
    text = requests.post(chat_url(gw), json=body("gpt-4.1", tools=TOOLS, tool_choice="none"), timeout=TIMEOUT).json()
    assert text["choices"][0]["message"]["content"] == reply_text("gpt-4.1", MESSAGES)
    bad = requests.post(chat_url(gw), json=body("gpt-4.1", tools=[{"type": "function"}]), timeout=TIMEOUT)
    assert bad.status_code == 400 and "tools[0]" in bad.json()["error"]["message"]


def test_a_streamed_tool_call_arrives_as_openai_sends_its_deltas(gw):
    plain = requests.post(chat_url(gw), json=body("gpt-4.1", tools=TOOLS), timeout=TIMEOUT).json()
    expected = plain["choices"][0]["message"]["tool_calls"][0]
    resp = requests.post(chat_url(gw), json=body("gpt-4.1", stream=True, tools=TOOLS,
                                                  stream_options={"include_usage": True}),
                         timeout=TIMEOUT, stream=True)
    payloads, error = read_stream(resp)
    events = parse(payloads)
    assert error is None and events[-1] == "[DONE]"
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert first["tool_calls"] == [{"index": 0, "id": expected["id"], "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]
    fragments = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[1:-3]]
    assert len(fragments) > 1 and all(set(f) == {"index", "function"} for f in fragments)
    assert "".join(f["function"]["arguments"] for f in fragments) == expected["function"]["arguments"]
    assert events[-3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]


def test_after_a_tool_result_the_model_answers_in_text(gw):
    call = requests.post(chat_url(gw), json=body("gpt-4.1", tools=TOOLS), timeout=TIMEOUT).json()[
        "choices"][0]["message"]
    history = MESSAGES + [call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "sunny"}]
    answer = requests.post(chat_url(gw), json=body("gpt-4.1", messages=history, tools=TOOLS), timeout=TIMEOUT).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == reply_text("gpt-4.1", history)


def test_embeddings_have_openais_shape_in_floats_and_base64(gw):
    url = gw.base_url("a") + "/embeddings"
    floats = requests.post(url, json={"model": "text-embedding-3-small", "input": ["a b", "c"]}, timeout=TIMEOUT).json()
    assert set(floats) == {"object", "data", "model", "usage"} and floats["object"] == "list"
    assert [set(d) for d in floats["data"]] == [{"object", "index", "embedding"}] * 2
    assert set(floats["usage"]) == {"prompt_tokens", "total_tokens"}
    packed = requests.post(url, json={"model": "text-embedding-3-small", "input": ["a b", "c"],
                                      "encoding_format": "base64"}, timeout=TIMEOUT).json()
    for f, b in zip(floats["data"], packed["data"]):
        assert struct.unpack("<8f", base64.b64decode(b["embedding"])) == pytest.approx(f["embedding"], abs=1e-6)
    bad = requests.post(url, json={"input": "x", "encoding_format": "int8"}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "encoding_format" in bad.json()["error"]["message"]


def test_usage_is_on_every_plain_answer_and_on_streams_that_ask_for_it(gw):
    plain = requests.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT).json()
    assert set(plain["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    without = parse(read_stream(requests.post(chat_url(gw), json=body("gpt-4.1", stream=True), timeout=TIMEOUT,
                                              stream=True))[0])
    assert not any("usage" in e for e in without if isinstance(e, dict))
    with_usage = parse(read_stream(requests.post(
        chat_url(gw), json=body("gpt-4.1", stream=True, stream_options={"include_usage": True}),
        timeout=TIMEOUT, stream=True))[0])
    assert [e["usage"] for e in with_usage if isinstance(e, dict) and "usage" in e] == [plain["usage"]]
