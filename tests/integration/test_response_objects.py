"""openai-python style reading through the client, against the simulated gateway."""

from __future__ import annotations

import json
import pickle

import pytest

from holysheep_lb import NotFoundError, Response
from holysheep_lb.simulator import MODELS, SimNode, SimulatedGateway, reply_text

MODEL = "gpt-4.1"
MSGS = [{"role": "user", "content": "what is the weather in Oslo"}]


@pytest.fixture
def gw():
    gateway = SimulatedGateway([SimNode("a"), SimNode("b")], seed=5)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop(timeout_s=3.0)


@pytest.fixture
def client(gw, make_client):
    return make_client(gw.client_nodes(), strategy="round_robin", cache=True)


def test_a_chat_answer_reads_like_openai_python_and_keeps_its_routing_metadata(client):
    resp = client.chat_completion(MSGS, model=MODEL)
    assert isinstance(resp, Response)
    assert resp.choices[0].message.content == reply_text(MODEL, MSGS) == resp.text
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens == resp.usage.prompt_tokens + \
        resp.usage.completion_tokens
    assert resp.id.startswith("chatcmpl-") and resp.model == resp["model"] == MODEL
    assert resp.node_id in ("a", "b") and len(resp.attempts) == 1 and resp.latency_ms > 0
    assert resp.model_dump() == json.loads(json.dumps(resp)) and "node_id" not in resp.model_dump()
    back = pickle.loads(pickle.dumps(resp))
    assert back == resp and back.node_id == resp.node_id and back.choices[0].message.content == resp.text


def test_the_assistant_message_goes_back_as_a_message_as_it_is(client):
    first = client.chat_completion(MSGS, model=MODEL)
    follow_up = [*MSGS, first.choices[0].message, {"role": "user", "content": "and tomorrow"}]
    second = client.chat_completion(follow_up, model=MODEL)
    assert second.choices[0].message.content == reply_text(MODEL, json.loads(json.dumps(follow_up)))


def test_a_cached_answer_reads_by_attribute_and_edits_do_not_reach_the_cache(client):
    first = client.chat_completion(MSGS, model=MODEL, temperature=0)
    first.choices[0].message["content"] = "edited by the caller"
    again = client.chat_completion(MSGS, model=MODEL, temperature=0)
    assert again.cached and again.choices[0].message.content == reply_text(MODEL, MSGS)
    assert again.usage.total_tokens == first.usage.total_tokens


def test_stream_chunks_read_like_openai_python(client):
    with client.chat_completion(MSGS, model=MODEL, stream=True) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stream.text == reply_text(MODEL, MSGS)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].id.startswith("chatcmpl-")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == stream.usage["total_tokens"]
    assert all(c.model == MODEL and c.object == "chat.completion.chunk" for c in chunks)
    assert [c.model_dump() for c in chunks] == json.loads(json.dumps(chunks))


def test_embeddings_and_models_read_by_attribute(client):
    emb = client.embeddings(["one", "two"], model="text-embedding-3-small")
    assert [d.index for d in emb.data] == [0, 1] and all(d.object == "embedding" for d in emb.data)
    assert len(emb.data[0].embedding) > 0 and all(isinstance(x, float) for x in emb.data[1].embedding)
    assert emb.usage.prompt_tokens == emb.usage.total_tokens > 0
    models = client.models()
    assert [m.id for m in models.data] == list(MODELS)
    assert models.data[0].owned_by == "holysheep-sim" and models.data[0].object == "model"


def test_a_status_error_from_the_gateway_says_what_the_server_said(client):
    with pytest.raises(NotFoundError) as info:
        client.request("GET", "/models/no-such-model")
    exc = info.value
    assert (exc.status_code, exc.code, exc.type, exc.param) == (404, "model_not_found", "invalid_request_error", None)
    assert exc.message == "The model 'no-such-model' does not exist" and exc.node_id in ("a", "b")
