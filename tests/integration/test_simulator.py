"""Integration tests for holysheep_lb.simulator.SimulatedGateway (loopback only)."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from holysheep_lb.simulator import MODELS, SimNode, SimulatedGateway, reply_text, sample_latency_ms

from ..conftest import wait_until

TIMEOUT = (2.0, 5.0)
CHAT_BODY = {
    "model": "deepseek-v3.2",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "one two three four five six seven eight"},
    ],
}


def pool_connections(session: requests.Session, url: str) -> int:
    pools = session.get_adapter(url).poolmanager.pools
    return sum(pools[key].num_connections for key in pools.keys())


def stream_events(resp):
    """Parsed SSE payloads ('[DONE]' kept as a string) from a streaming response."""
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: ") :].decode("utf-8")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def content_of(events):
    return "".join(
        ev["choices"][0]["delta"].get("content", "")
        for ev in events
        if isinstance(ev, dict) and ev["choices"]
    )


@pytest.fixture
def gw():
    gateway = SimulatedGateway(
        [SimNode("a", region="us-east"), {"id": "b", "region": "eu-west"}, SimNode("c", region="ap-south")],
        seed=7,
    )
    gateway.start()
    try:
        yield gateway
    finally:
        t0 = time.monotonic()
        gateway.stop(timeout_s=3.0)
        assert time.monotonic() - t0 < 3.5


def chat_url(gateway, node="a"):
    return gateway.base_url(node) + "/chat/completions"


# --------------------------------------------------------------------- endpoints


def test_client_nodes_and_base_url(gw):
    nodes = gw.client_nodes()
    assert [n["id"] for n in nodes] == ["a", "b", "c"]
    assert [n["region"] for n in nodes] == ["us-east", "eu-west", "ap-south"]
    ports = set()
    for n in nodes:
        assert n["base_url"] == gw.base_url(n["id"])
        assert n["base_url"].startswith("http://127.0.0.1:") and n["base_url"].endswith("/v1")
        ports.add(n["base_url"])
    assert len(ports) == 3
    assert [n.id for n in gw.nodes] == ["a", "b", "c"]


def test_models_endpoint(gw):
    resp = requests.get(gw.base_url("b") + "/models", timeout=TIMEOUT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    for model in ("deepseek-v3.2", "gemini-2.5-flash", "gpt-4.1", "claude-sonnet-4.5", "text-embedding-3-small"):
        assert model in ids
    assert ids == list(MODELS)
    assert all(m["object"] == "model" and m["owned_by"] == "holysheep-sim" for m in body["data"])
    assert resp.headers["x-sim-node"] == "b"


def test_chat_completion_shape_usage_and_determinism(gw):
    results = []
    for node in ("a", "b", "c"):
        resp = requests.post(chat_url(gw, node), json=CHAT_BODY, timeout=TIMEOUT)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["x-request-id"].startswith("req_")
        assert resp.headers["x-sim-node"] == node
        results.append(resp.json())
    first = results[0]
    assert first["id"].startswith("chatcmpl-")
    assert first["object"] == "chat.completion"
    assert isinstance(first["created"], int)
    assert first["model"] == "deepseek-v3.2"
    choice = first["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    assert text == reply_text(CHAT_BODY["model"], CHAT_BODY["messages"])
    assert text.startswith("[deepseek-v3.2] ") and "one two three" in text
    usage = first["usage"]
    chars = sum(len(m["content"]) for m in CHAT_BODY["messages"])
    assert usage["prompt_tokens"] == -(-chars // 4) + 4 * len(CHAT_BODY["messages"])
    assert usage["completion_tokens"] == len(text.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # same request -> same text and usage on every node; ids differ
    assert {r["choices"][0]["message"]["content"] for r in results} == {text}
    assert all(r["usage"] == usage for r in results)
    assert len({r["id"] for r in results}) == 3


def test_max_tokens_truncates_words(gw):
    resp = requests.post(chat_url(gw), json=dict(CHAT_BODY, max_tokens=4), timeout=TIMEOUT)
    body = resp.json()
    text = body["choices"][0]["message"]["content"]
    assert text == "[deepseek-v3.2] Echo: one two"
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"


def test_finish_reason_is_length_only_when_max_tokens_cut_the_answer(gw):
    whole = requests.post(chat_url(gw), json=dict(CHAT_BODY, max_tokens=1000), timeout=TIMEOUT).json()
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = requests.post(chat_url(gw), json=dict(CHAT_BODY, max_tokens=2, stream=True), timeout=TIMEOUT)
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in streamed.text.splitlines()
                if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}


def test_bad_requests_and_unknown_path(gw):
    url = chat_url(gw)
    resp = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    for bad in ({"model": "gpt-4.1"}, {"model": "gpt-4.1", "messages": []}):
        resp = requests.post(url, json=bad, timeout=TIMEOUT)
        assert resp.status_code == 400
        assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = requests.get(gw.base_url("a") + "/nope", timeout=TIMEOUT)
    assert resp.status_code == 404
    assert "error" in resp.json()


def test_embeddings(gw):
    body = {"model": "text-embedding-3-small", "input": ["hello", "world"]}
    r1 = requests.post(gw.base_url("a") + "/embeddings", json=body, timeout=TIMEOUT).json()
    r2 = requests.post(gw.base_url("c") + "/embeddings", json=body, timeout=TIMEOUT).json()
    assert r1["object"] == "list" and r1["model"] == "text-embedding-3-small"
    assert [d["index"] for d in r1["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in r1["data"])
    assert all(isinstance(x, float) for x in r1["data"][0]["embedding"])
    assert r1["data"] == r2["data"]  # deterministic, node independent
    assert r1["data"][0]["embedding"] != r1["data"][1]["embedding"]
    assert r1["usage"]["prompt_tokens"] == r1["usage"]["total_tokens"] > 0
    single = requests.post(gw.base_url("b") + "/embeddings", json={"model": "m", "input": "x"}, timeout=TIMEOUT)
    assert single.status_code == 200 and len(single.json()["data"]) == 1


# ---------------------------------------------------------------------- streaming


def test_streaming_matches_non_stream_and_keeps_alive(gw):
    url = chat_url(gw, "b")
    with requests.Session() as s:
        plain = s.post(url, json=CHAT_BODY, timeout=TIMEOUT).json()
        text = plain["choices"][0]["message"]["content"]

        resp = s.post(url, json=dict(CHAT_BODY, stream=True), stream=True, timeout=TIMEOUT)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        events = stream_events(resp)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert not any("usage" in c for c in chunks)
        assert content_of(events) == text
        assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == len(text.split())

        resp = s.post(
            url,
            json=dict(CHAT_BODY, stream=True, stream_options={"include_usage": True}),
            stream=True,
            timeout=TIMEOUT,
        )
        events = stream_events(resp)
        assert events[-1] == "[DONE]"
        assert content_of(events) == text
        usage_chunks = [e for e in events[:-1] if e["choices"] == []]
        assert len(usage_chunks) == 1
        assert usage_chunks[0]["usage"] == plain["usage"]

        # chunked framing is correct -> the same connection was reused throughout
        assert s.post(url, json=CHAT_BODY, timeout=TIMEOUT).status_code == 200
        assert pool_connections(s, url) == 1


def test_stream_with_chunk_delay(gw):
    gw.configure("a", chunk_delay_ms=5)
    resp = requests.post(chat_url(gw), json=dict(CHAT_BODY, stream=True), stream=True, timeout=TIMEOUT)
    events = stream_events(resp)
    assert events[-1] == "[DONE]"
    assert content_of(events) == reply_text(CHAT_BODY["model"], CHAT_BODY["messages"])


def test_reset_midstream_gives_partial_stream_then_error(gw):
    gw.configure("a", stream_fault="reset_midstream", stream_fault_after_chunks=2, chunk_delay_ms=10)
    resp = requests.post(chat_url(gw), json=dict(CHAT_BODY, stream=True), stream=True, timeout=TIMEOUT)
    assert resp.status_code == 200
    lines = []
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        for line in resp.iter_lines():
            if line:
                lines.append(line)
    events = [json.loads(line[len(b"data: ") :]) for line in lines]
    assert b"data: [DONE]" not in lines
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    contents = [e["choices"][0]["delta"]["content"] for e in events[1:]]
    assert contents == ["[deepseek-v3.2] ", "Echo: "]
    # non-stream requests are unaffected, the node keeps serving
    assert requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT).status_code == 200


def test_stall_midstream_times_out_and_clearing_releases(gw):
    gw.configure("a", stream_fault="stall_midstream", stream_fault_after_chunks=1)
    resp = requests.post(chat_url(gw), json=dict(CHAT_BODY, stream=True), stream=True, timeout=(2.0, 0.5))
    assert resp.status_code == 200
    lines = []
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError) as excinfo:
        for line in resp.iter_lines():
            if line:
                lines.append(line)
    assert time.monotonic() - t0 < 3.0
    assert "timed out" in str(excinfo.value).lower()
    assert len(lines) == 2  # role chunk + 1 content chunk
    resp.close()
    assert gw.in_flight("a") == 1
    gw.configure("a", stream_fault=None)
    assert wait_until(lambda: gw.in_flight("a") == 0, 2.0)


# ------------------------------------------------------------------ error dice


def test_error_rate_gives_5xx(gw):
    gw.configure("a", error_rate=1.0)
    statuses = set()
    for _ in range(12):
        resp = requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT)
        assert resp.status_code in (500, 502, 503)
        assert "message" in resp.json()["error"]
        statuses.add(resp.status_code)
    assert len(statuses) >= 2  # picked among 500/502/503
    assert requests.get(gw.base_url("a") + "/models", timeout=TIMEOUT).status_code >= 500
    assert requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT).status_code == 200
    gw.configure("a", error_rate=0.0)
    assert requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT).status_code == 200


def test_rate_limit_gives_429_with_retry_after(gw):
    gw.configure("b", rate_limit_rate=1.0, retry_after_s=2)
    resp = requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "2"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    gw.configure("b", retry_after_s=0.25)
    resp = requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT)
    assert resp.status_code == 429
    assert float(resp.headers["Retry-After"]) == 0.25


def test_error_rate_is_probabilistic_and_seeded():
    def run():
        with SimulatedGateway([SimNode("x", error_rate=0.5)], seed=123) as g:
            with requests.Session() as s:
                return [s.post(chat_url(g, "x"), json=CHAT_BODY, timeout=TIMEOUT).status_code for _ in range(30)]

    first, second = run(), run()
    assert first == second  # sequential requests + same seed -> same outcomes
    assert 200 in first and any(code >= 500 for code in first)


# ------------------------------------------------------------------------ faults


def test_refuse_then_recover_on_same_port(gw):
    url = gw.base_url("a") + "/models"
    with requests.Session() as s:
        assert s.get(url, timeout=TIMEOUT).status_code == 200  # keep-alive connection established
        gw.configure("a", fault="refuse")
        with pytest.raises(requests.exceptions.ConnectionError) as excinfo:
            s.get(url, timeout=TIMEOUT)
        assert "refused" in str(excinfo.value).lower()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT)
        assert gw.request_count("a") == 1  # refused connections are not counted
        assert requests.get(gw.base_url("b") + "/models", timeout=TIMEOUT).status_code == 200

        gw.configure("a", fault=None)
        assert gw.base_url("a") + "/models" == url  # same port
        assert s.get(url, timeout=TIMEOUT).status_code == 200
        assert gw.request_count("a") == 2


def test_refuse_at_start_then_listen():
    with SimulatedGateway([SimNode("r", fault="refuse")]) as g:
        url = g.base_url("r") + "/models"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, timeout=TIMEOUT)
        g.configure("r", fault=None)
        assert requests.get(url, timeout=TIMEOUT).status_code == 200


def _post_in_thread(url, body, timeout):
    box = {}
    done = threading.Event()

    def run():
        try:
            box["resp"] = requests.post(url, json=body, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            box["exc"] = exc
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return box, done


def test_hang_blocks_until_cleared(gw):
    gw.configure("a", fault="hang", hang_s=30)
    box, done = _post_in_thread(chat_url(gw), CHAT_BODY, (2.0, 10.0))
    assert wait_until(lambda: gw.in_flight("a") == 1, 3.0)
    assert not done.wait(0.2)  # really hanging
    t0 = time.monotonic()
    gw.configure("a", fault=None)
    assert done.wait(3.0)
    assert time.monotonic() - t0 < 2.0
    assert isinstance(box.get("exc"), requests.exceptions.ConnectionError)  # closed without a response
    assert wait_until(lambda: gw.in_flight("a") == 0, 2.0)
    assert requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT).status_code == 200


def test_hang_ends_after_hang_s(gw):
    gw.configure("c", fault="hang", hang_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(gw.base_url("c") + "/models", timeout=(2.0, 5.0))
    assert 0.15 <= time.monotonic() - t0 < 3.0


def test_reset_gives_connection_error(gw):
    gw.configure("b", fault="reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT)
    assert gw.request_count("b") == 1
    gw.configure("b", fault=None)
    assert requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT).status_code == 200


def test_malformed_gives_invalid_json(gw):
    gw.configure("c", fault="malformed")
    resp = requests.post(chat_url(gw, "c"), json=CHAT_BODY, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        resp.json()


def _outcomes_of(gateway, node, n):
    """Send ``n`` sequential chat requests; return what each client saw, in order."""
    seen = []
    with requests.Session() as s:
        for _ in range(n):
            try:
                resp = s.post(chat_url(gateway, node), json=CHAT_BODY, timeout=TIMEOUT)
            except requests.exceptions.ConnectionError:
                seen.append("reset")
                continue
            try:
                resp.json()
            except ValueError:
                seen.append("malformed")
                continue
            seen.append("ok" if resp.status_code == 200 else "error_5xx")
    return seen


def test_reset_and_malformed_rates_are_probabilistic_seeded_and_counted():
    spec = [SimNode("x", reset_rate=0.25, malformed_rate=0.25, error_rate=0.2)]

    def run():
        with SimulatedGateway(spec, seed=5) as g:
            seen = _outcomes_of(g, "x", 80)
            expected = {k: seen.count(k) for k in set(seen)}
            # an answer is counted just after it is written: the client may see it first
            assert wait_until(lambda: g.outcomes("x") == expected), g.outcomes("x")
            assert g.outcomes("x", "/v1/chat/completions/") == g.outcomes("x")
            assert g.outcomes("x", "/v1/models") == {}
            return seen

    first, second = run(), run()
    assert first == second  # same seed, sequential requests -> same outcomes
    for kind in ("ok", "reset", "malformed", "error_5xx"):
        assert first.count(kind) >= 2, (kind, first.count(kind))  # 80 x 0.25 resets, ...
    assert 12 <= first.count("reset") <= 30 and 12 <= first.count("malformed") <= 30


def test_fault_rates_leave_the_seeded_5xx_sequence_unchanged():
    def statuses(**rates):
        with SimulatedGateway([SimNode("x", error_rate=0.5, **rates)], seed=9) as g:
            return [s for s in _outcomes_of(g, "x", 30)]

    plain = statuses()
    with_faults = statuses(reset_rate=0.3)
    # where no reset was rolled, the 5xx dice gave the same answer as without resets
    assert [a for a, b in zip(plain, with_faults) if b != "reset"] == [b for b in with_faults if b != "reset"]
    assert "reset" in with_faults and "error_5xx" in plain


def test_outcomes_count_faults_and_reset_with_the_counters(gw):
    gw.configure("a", fault="malformed")
    _outcomes_of(gw, "a", 2)
    gw.configure("a", fault="reset")
    _outcomes_of(gw, "a", 1)
    gw.configure("a", fault=None)
    _outcomes_of(gw, "a", 3)
    requests.post(gw.base_url("a") + "/nope", json={}, timeout=TIMEOUT)
    expected = {"malformed": 2, "reset": 1, "ok": 3, "error_4xx": 1}
    assert wait_until(lambda: gw.outcomes("a") == expected), gw.outcomes("a")
    assert gw.outcomes("b") == {}
    with pytest.raises(ValueError):
        gw.configure("a", reset_rate=1.5)
    with pytest.raises(ValueError):
        gw.configure("a", malformed_rate=-0.1)
    gw.reset_counts()
    assert gw.outcomes("a") == {}


# ----------------------------------------------------- latency, capacity, counts


def test_constant_latency_applies(gw):
    gw.configure("a", latency_ms=60)
    t0 = time.monotonic()
    assert requests.get(gw.base_url("a") + "/models", timeout=TIMEOUT).status_code == 200
    assert time.monotonic() - t0 >= 0.055


def test_lognormal_latency_sampler_matches_median_and_p99():
    rng = random.Random(42)
    samples = sorted(sample_latency_ms(rng, 100.0, 400.0) for _ in range(20000))
    assert statistics.median(samples) == pytest.approx(100.0, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(400.0, rel=0.15)
    assert sample_latency_ms(rng, 50.0, None) == 50.0
    assert sample_latency_ms(rng, 50.0, 10.0) == 50.0


def test_capacity_limits_concurrency(gw):
    gw.configure("a", capacity=2, latency_ms=100)
    barrier = threading.Barrier(6)

    def one(_):
        barrier.wait(timeout=5)
        return requests.post(chat_url(gw), json=CHAT_BODY, timeout=TIMEOUT).status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(one, range(6), timeout=10))
    elapsed = time.monotonic() - t0
    assert codes == [200] * 6
    assert gw.max_concurrency_seen("a") == 2
    assert elapsed >= 0.28  # three "waves" of 100 ms
    assert gw.in_flight("a") == 0


def test_uncapped_concurrency_is_seen(gw):
    gw.configure("b", latency_ms=150)
    barrier = threading.Barrier(4)

    def one(_):
        barrier.wait(timeout=5)
        return requests.post(chat_url(gw, "b"), json=CHAT_BODY, timeout=TIMEOUT).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(one, range(4), timeout=10)) == [200] * 4
    assert gw.max_concurrency_seen("b") >= 3


def test_listing_models_takes_no_capacity_slot(gw):
    """Capacity is concurrent model work: a health probe's GET /models neither waits for
    a slot nor holds one (it would otherwise cost a full answer's worth of capacity)."""
    gw.configure("a", capacity=0)  # no model request is ever served
    assert requests.get(gw.base_url("a") + "/models", timeout=(2.0, 5.0)).status_code == 200
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(chat_url(gw, "a"), json=CHAT_BODY, timeout=(2.0, 0.3))  # queued for a slot
    assert gw.max_concurrency_seen("a") == 0
    assert gw.request_count("a", "/v1/models") == 1


def test_counts_per_node_and_path(gw):
    with requests.Session() as s:
        for _ in range(3):
            s.post(chat_url(gw, "a"), json=CHAT_BODY, timeout=TIMEOUT)
        s.get(gw.base_url("a") + "/models", timeout=TIMEOUT)
        s.get(gw.base_url("b") + "/models", timeout=TIMEOUT)
    assert gw.counts() == {"a": 4, "b": 1, "c": 0}
    assert gw.request_count("a") == 4
    assert gw.request_count("a", "/v1/chat/completions") == 3
    assert gw.request_count("a", "/v1/models") == 1
    assert gw.request_count("b", "/v1/chat/completions") == 0
    assert gw.in_flight("a") == 0
    assert gw.max_concurrency_seen("a") == 1
    gw.reset_counts()
    assert gw.counts() == {"a": 0, "b": 0, "c": 0}
    assert gw.request_count("a", "/v1/chat/completions") == 0
    assert gw.max_concurrency_seen("a") == 0


# ---------------------------------------------------------------- configuration


def test_configure_validation(gw):
    with pytest.raises(ValueError, match="bogus_field"):
        gw.configure("a", bogus_field=1)
    with pytest.raises(ValueError):
        gw.configure("a", fault="explode")
    with pytest.raises(ValueError):
        gw.configure("a", error_rate=1.5)
    with pytest.raises(KeyError):
        gw.configure("zzz", latency_ms=1)
    with pytest.raises(ValueError, match="nope"):
        SimulatedGateway([{"id": "x", "nope": 1}])
    with pytest.raises(ValueError):
        SimulatedGateway([SimNode("x"), SimNode("x")])
    gw.configure("a", region="moon", latency_ms=1.5)
    assert gw.nodes[0].region == "moon" and gw.nodes[0].latency_ms == 1.5
    assert gw.client_nodes()[0]["region"] == "moon"


# ------------------------------------------------------------------------ stop


def test_stop_is_bounded_with_hanging_requests():
    g = SimulatedGateway([SimNode("h", fault="hang", hang_s=60), SimNode("q", capacity=0), SimNode("ok")]).start()
    url_h = chat_url(g, "h")
    box_h, done_h = _post_in_thread(url_h, CHAT_BODY, (2.0, 20.0))
    box_q, done_q = _post_in_thread(chat_url(g, "q"), CHAT_BODY, (2.0, 20.0))  # queued forever
    idle = requests.Session()  # an idle keep-alive connection must not delay stop()
    assert idle.get(g.base_url("ok") + "/models", timeout=TIMEOUT).status_code == 200
    assert wait_until(lambda: g.in_flight("h") == 1 and g.in_flight("q") == 1, 3.0)
    t0 = time.monotonic()
    g.stop(timeout_s=2.0)
    assert time.monotonic() - t0 < 3.0
    assert done_h.wait(3.0) and done_q.wait(3.0)
    assert isinstance(box_h.get("exc"), requests.exceptions.ConnectionError)
    assert isinstance(box_q.get("exc"), requests.exceptions.ConnectionError)
    assert g.in_flight("h") == 0 and g.in_flight("q") == 0
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(g.base_url("q") + "/models", timeout=TIMEOUT)
    idle.close()
    g.stop()  # idempotent
    t0 = time.monotonic()
    g.stop(timeout_s=0.5)
    assert time.monotonic() - t0 < 0.1


def test_context_manager_and_stop_without_start():
    SimulatedGateway([SimNode("x")]).stop()  # never started: no-op
    with SimulatedGateway([SimNode("x")]) as g:
        assert g.running
        assert requests.get(g.base_url("x") + "/models", timeout=TIMEOUT).status_code == 200
    assert not g.running
