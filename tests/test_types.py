"""Answers read by attribute as in openai-python, and stay the plain JSON dicts they were."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from holysheep_lb import Response
from holysheep_lb.errors import Attempt
from holysheep_lb.streaming import SSEEvent, decode_event
from holysheep_lb.types import (
    ChatCompletionChunk,
    Choice,
    ChoiceDelta,
    Embedding,
    Function,
    JSONList,
    JSONObject,
    Message,
    Model,
    ToolCall,
    Usage,
)


def completion() -> dict:
    """A chat.completion with a tool call, usage details and a field OpenAI does not define."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4.1",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            "finish_reason": "tool_calls",
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
                  "prompt_tokens_details": {"cached_tokens": 4}},
        "x_gateway": {"route": [{"hop": "eu-west", "ms": 3}], "tags": ["a", "b"]},
    }


def response(data: dict = None, **meta) -> Response:  # type: ignore[assignment]
    meta.setdefault("model", "gpt-4.1")
    return Response(completion() if data is None else data, node_id="n1", region="eu-west", **meta)


def all_plain(value) -> bool:
    """True when every dict and list inside is exactly a dict or a list (no view)."""
    if isinstance(value, dict):
        return type(value) is dict and all(all_plain(v) for v in value.values())
    if isinstance(value, list):
        return type(value) is list and all(all_plain(v) for v in value)
    return True


# -- reading by attribute -------------------------------------------------------------


def test_a_completion_reads_by_attribute_all_the_way_down():
    resp = response()
    assert resp.id == "chatcmpl-1" and resp.object == "chat.completion" and resp.created == 1700000000
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.index == 0
    assert choice.message.role == "assistant" and choice.message.content is None
    assert choice.message.tool_calls[0].function.arguments == "{\"city\": \"Oslo\"}"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert resp.usage.prompt_tokens == 12 and resp.usage.total_tokens == 19
    assert resp.usage.prompt_tokens_details.cached_tokens == 4


def test_each_level_is_a_view_of_its_kind_and_still_the_dict_or_list_it_was():
    resp = response()
    assert type(resp.choices) is JSONList and isinstance(resp.choices, list)
    assert type(resp.choices[0]) is Choice and type(resp.choices[0].message) is Message
    assert type(resp.choices[0].message.tool_calls[0]) is ToolCall
    assert type(resp.choices[0].message.tool_calls[0].function) is Function
    assert type(resp.usage) is Usage
    assert all(isinstance(v, dict) for v in (resp, resp.choices[0], resp.choices[0].message, resp.usage))
    assert resp.choices[0]["message"]["tool_calls"][1]["function"]["name"] == "get_time"
    assert resp.choices[0].message["content"] is None


def test_a_known_field_the_server_omitted_reads_as_none_at_every_level():
    resp = response()
    assert resp.system_fingerprint is None and resp.service_tier is None
    assert resp.choices[0].logprobs is None
    assert resp.choices[0].message.refusal is None and resp.choices[0].message.audio is None
    assert resp.choices[0].message.reasoning_content is None
    assert resp.usage.completion_tokens_details is None
    assert resp.usage.prompt_tokens_details.audio_tokens is None
    bare = Response({"choices": [{"message": {}}]})
    assert bare.id is None and bare.usage is None and bare.data is None
    assert bare.choices[0].finish_reason is None and bare.choices[0].message.content is None
    assert "content" not in bare.choices[0].message  # reading a missing field adds no key


def test_a_misspelt_name_raises_attribute_error_naming_the_likely_field():
    resp = response()
    with pytest.raises(AttributeError, match=r"'Message' object has no attribute 'contnet'.*did you mean 'content'"):
        resp.choices[0].message.contnet  # noqa: B018
    with pytest.raises(AttributeError, match="'Response' object has no attribute 'choice'"):
        resp.choice  # noqa: B018
    assert not hasattr(resp.usage, "prompt_token")
    assert getattr(resp.choices[0], "finsh_reason", "default") == "default"


def test_fields_openai_does_not_define_read_by_attribute_when_present():
    resp = response()
    assert resp.x_gateway.route[0].hop == "eu-west"
    assert type(resp.x_gateway) is JSONObject and resp.x_gateway.tags == ["a", "b"]
    with pytest.raises(AttributeError):
        resp.x_gateway.missing  # noqa: B018  # no known fields for an object of unknown shape


def test_names_starting_with_an_underscore_are_never_read_from_the_json():
    resp = Response({"__deepcopy__": "x", "__reduce_ex__": "y", "_private": 1, "choices": []})
    with pytest.raises(AttributeError):
        resp._private  # noqa: B018
    assert copy.deepcopy(resp) == resp and pickle.loads(pickle.dumps(resp)) == resp


def test_dict_methods_and_routing_metadata_win_over_keys_of_the_same_name():
    resp = Response({"items": [1], "model": "gpt-4.1-2025-04-14", "node_id": "from-json"},
                    node_id="n1", model="gpt-4.1")
    assert callable(resp.items) and resp["items"] == [1]
    assert resp.node_id == "n1" and resp["node_id"] == "from-json"
    assert resp.model == "gpt-4.1" and resp["model"] == "gpt-4.1-2025-04-14"


def test_attributes_are_read_only_and_changes_by_key_are_seen_by_attribute():
    resp = response()
    message = resp.choices[0].message
    with pytest.raises(AttributeError):
        message.content = "edited"  # type: ignore[misc]
    message["content"] = "edited"
    assert resp["choices"][0]["message"]["content"] == "edited" == resp.choices[0].message.content
    resp["choices"][0]["message"]["role"] = "tool"
    assert message.role == "tool"


def test_dir_lists_the_known_fields_and_the_keys():
    names = dir(response().choices[0].message)
    assert {"content", "tool_calls", "refusal", "role", "model_dump"} <= set(names)


def test_a_value_of_an_unexpected_type_is_returned_as_it_is():
    resp = Response({"choices": [{"message": "plain text", "index": "0"}, None], "usage": None})
    assert resp.choices[0].message == "plain text" and resp.choices[0].index == "0"
    assert resp.choices[1] is None and resp.usage is None


# -- laziness: nothing is built or copied until an attribute is read ---------------------


def test_views_are_built_only_when_an_attribute_is_read_and_only_on_its_path():
    resp = response()
    assert all_plain(dict(resp))
    assert resp["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"  # by key: no view
    assert all_plain(dict(resp))
    assert resp.id == "chatcmpl-1"
    assert all_plain(dict(resp))
    assert resp.choices[0].finish_reason == "tool_calls"
    assert type(resp["choices"]) is JSONList and type(resp["choices"][0]) is Choice
    assert all_plain(dict(resp["choices"][0]))  # its message was not read yet
    assert all_plain(resp["usage"]) and all_plain(resp["x_gateway"])


def test_a_view_is_built_once_then_reused():
    resp = response()
    assert resp.choices is resp.choices
    assert resp.choices[0].message is resp.choices[0].message
    assert resp.usage is resp.usage


def test_reading_never_changes_the_callers_dicts():
    data = completion()
    before = copy.deepcopy(data)
    resp = Response(data)
    for call in resp.choices[0].message.tool_calls:
        assert call.function.name
    assert resp.x_gateway.route[0].hop == "eu-west"
    assert data == before and all_plain(data)


def test_a_vector_is_returned_as_it_is_not_copied():
    vector = [0.25] * 1536
    resp = Response({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}]})
    assert resp.data[0].embedding is vector


# -- lists ---------------------------------------------------------------------------------


def test_iterating_slicing_and_reversing_a_list_yield_views():
    resp = response()
    calls = resp.choices[0].message.tool_calls
    assert [type(c) for c in calls] == [ToolCall, ToolCall]
    assert [c.id for c in calls[1:]] == ["call_2"] and isinstance(calls[1:], JSONList)
    assert [c.id for c in reversed(calls)] == ["call_2", "call_1"]
    assert calls[-1].function.name == "get_time"
    assert list(calls) == completion()["choices"][0]["message"]["tool_calls"]
    with pytest.raises(IndexError):
        calls[5]  # noqa: B018


# -- stream chunks ---------------------------------------------------------------------------


def chunk_event(obj: dict) -> SSEEvent:
    return SSEEvent(None, json.dumps(obj))


def test_stream_chunks_read_by_attribute():
    first = decode_event(chunk_event({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4.1",
                                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                                                   "finish_reason": None}]}))
    last = decode_event(chunk_event({"id": "c", "object": "chat.completion.chunk",
                                     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = decode_event(chunk_event({"id": "c", "object": "chat.completion.chunk", "choices": [],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
    assert type(first) is ChatCompletionChunk and type(first.choices[0].delta) is ChoiceDelta
    assert first.choices[0].delta.content == "Hel" and first.choices[0].delta.role == "assistant"
    assert first.choices[0].finish_reason is None and first.usage is None
    assert (last.choices[0].delta.content or "") == "" and last.choices[0].finish_reason == "stop"
    assert last.model is None
    assert usage.choices == [] and usage.usage.total_tokens == 5
    assert decode_event(SSEEvent(None, "[DONE]")) is None


def test_streamed_tool_call_arguments_join_by_attribute():
    pieces = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{\"city\":"}},
        {"index": 0, "function": {"arguments": " \"Oslo\"}"}},
    ]
    chunks = [decode_event(chunk_event({"object": "chat.completion.chunk",
                                        "choices": [{"index": 0, "delta": {"tool_calls": [p]}}]}))
              for p in pieces]
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks]
    assert calls[0].id == "call_1" and calls[1].id is None and calls[1].function.name is None
    assert "".join(c.function.arguments for c in calls) == "{\"city\": \"Oslo\"}"


# -- embeddings and models --------------------------------------------------------------------


def test_embeddings_and_models_lists_read_by_attribute():
    emb = Response({"object": "list", "model": "text-embedding-3-small",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2}})
    assert type(emb.data[0]) is Embedding and emb.data[0].embedding == [0.5, -0.5] and emb.data[0].index == 0
    assert emb.usage.prompt_tokens == 2 and emb.usage.completion_tokens is None and emb.choices is None
    models = Response({"object": "list", "data": [{"id": "gpt-4.1", "object": "model", "created": 0}]})
    assert type(models.data[0]) is Model and models.data[0].id == "gpt-4.1" and models.data[0].owned_by is None


# -- the dict it is: equality, JSON, pickling, copies, model_dump --------------------------------


@pytest.mark.parametrize("read_first", [False, True], ids=["untouched", "after-attribute-reads"])
def test_equality_and_json_are_those_of_the_plain_dict(read_first):
    resp = response()
    if read_first:
        assert resp.choices[0].message.tool_calls[0].function.name and resp.usage.prompt_tokens_details
    plain = completion()
    assert resp == plain and plain == resp and isinstance(resp, dict)
    assert resp.choices == plain["choices"] and resp.choices[0].message == plain["choices"][0]["message"]
    assert json.dumps(resp) == json.dumps(plain)
    assert json.loads(json.dumps({"answer": resp.choices[0].message})) == {"answer": plain["choices"][0]["message"]}


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_keeps_the_json_the_views_and_the_metadata(protocol):
    attempts = (Attempt("n0", 12.5, 503, "InternalServerError: boom", "5xx"), Attempt("n1", 20.0, 200))
    resp = response(attempts=attempts, latency_ms=33.0, request_id="req-1", fallback=True, cached=True)
    resp.extra["cost"] = {"usd": 0.001}
    assert resp.choices[0].message.tool_calls[0].id == "call_1"  # views built before pickling
    back = pickle.loads(pickle.dumps(resp, protocol=protocol))
    assert type(back) is Response and back == completion()
    assert (back.node_id, back.region, back.model, back.attempts, back.latency_ms, back.request_id,
            back.fallback, back.cached, back.extra) == ("n1", "eu-west", "gpt-4.1", attempts, 33.0, "req-1",
                                                          True, True, {"cost": {"usd": 0.001}})
    assert back.choices[0].message.tool_calls[1].function.name == "get_time"
    assert back.model_dump() == completion()
    choice = pickle.loads(pickle.dumps(resp.choices[0], protocol=protocol))
    assert type(choice) is Choice and choice.message.tool_calls[0].function.name == "get_weather"


def test_deepcopy_is_independent_and_keeps_the_metadata():
    resp = response(request_id="req-1")
    assert resp.choices[0].message.role == "assistant"
    twin = copy.deepcopy(resp)
    twin.choices[0].message["content"] = "changed"
    twin["usage"]["total_tokens"] = 0
    assert resp.choices[0].message.content is None and resp.usage.total_tokens == 19
    assert twin.request_id == "req-1" and twin.node_id == "n1" and twin.model == "gpt-4.1"


def test_model_dump_is_the_plain_json_as_sent_and_a_deep_copy():
    resp = response()
    assert resp.choices[0].message.tool_calls[0].function.name and resp.x_gateway.route[0].hop
    dumped = resp.model_dump()
    assert dumped == completion() and all_plain(dumped)
    assert list(dumped) == list(completion())  # key order as sent
    dumped["choices"][0]["message"]["content"] = "changed"
    dumped["x_gateway"]["route"].clear()
    assert resp.choices[0].message.content is None and resp.x_gateway.route[0].hop == "eu-west"
    assert resp.choices[0].message.model_dump() == completion()["choices"][0]["message"]
    assert json.loads(resp.model_dump_json()) == completion()
    assert json.loads(resp.model_dump_json(indent=2)) == completion() and "\n" in resp.model_dump_json(indent=2)
    assert "node_id" not in dumped and "n1" not in resp.model_dump_json()  # metadata is not JSON


def test_a_view_class_must_declare_slots():
    with pytest.raises(TypeError, match="must declare __slots__"):
        class Sloppy(JSONObject):  # noqa: F841
            name: str


def test_probing_for_a_missing_attribute_is_cheap_and_the_error_still_explains_itself(monkeypatch):
    import holysheep_lb.types as views

    resp = response()
    real = views.difflib.get_close_matches
    monkeypatch.setattr(views.difflib, "get_close_matches", lambda *a, **k: pytest.fail("message composed"))
    # the client probes answers this way on every call: no "did you mean" is composed for it
    assert getattr(resp, "defer_outcome", None) is None and not hasattr(resp.choices[0], "delta")
    monkeypatch.setattr(views.difflib, "get_close_matches", real)
    with pytest.raises(AttributeError) as info:
        resp.choices[0].mesage  # noqa: B018
    assert "did you mean 'message'" in str(info.value)
    assert "did you mean 'message'" in str(pickle.loads(pickle.dumps(info.value)))


def test_threads_reading_one_answer_at_once_all_see_the_same_values():
    from concurrent.futures import ThreadPoolExecutor

    resp = response()

    def read(_: int) -> tuple:
        return (resp.choices[0].message.tool_calls[1].function.name, resp.usage.prompt_tokens_details.cached_tokens,
                resp.x_gateway.route[0].hop, json.dumps(resp))

    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(read, range(400)))
    assert results == {("get_time", 4, "eu-west", json.dumps(completion()))}
    assert resp == completion()
