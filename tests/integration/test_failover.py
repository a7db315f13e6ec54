"""Failover against the simulated gateway: the behaviours callers rely on."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from holysheep_lb import AllAttemptsFailedError, BadRequestError, HolySheepError

MSGS = [{"role": "user", "content": "ping"}]
CHAT = "/v1/chat/completions"


def test_refusing_node_causes_no_caller_errors(four_nodes, make_client):
    four_nodes.configure("b", fault="refuse")
    client = make_client(four_nodes.client_nodes(), strategy="round_robin")
    errors = 0
    for _ in range(200):
        try:
            client.chat_completion(MSGS, model="gpt-4.1")
        except HolySheepError:
            errors += 1
    assert errors == 0
    stats = client.stats()
    assert stats["successes"] == 200
    assert stats["nodes"]["b"]["failures"]["connect"] >= 1
    assert four_nodes.request_count("b") == 0  # refused connections never reach it


def test_500_node_fails_over_and_attempts_are_recorded(four_nodes, make_client):
    four_nodes.configure("a", error_rate=1.0)
    client = make_client(four_nodes.client_nodes(), strategy="round_robin")
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert resp.node_id != "a"
    assert [a.node_id for a in resp.attempts][0] == "a"
    assert resp.attempts[0].status_code in (500, 502, 503) and not resp.attempts[0].ok
    assert resp.attempts[-1].ok and resp.attempts[-1].status_code == 200
    assert resp["choices"][0]["message"]["content"].startswith("[gpt-4.1]")


def test_400_is_raised_after_one_attempt_without_trying_others(four_nodes, make_client):
    client = make_client(four_nodes.client_nodes(), strategy="round_robin")
    with pytest.raises(BadRequestError) as info:
        client.request("POST", "/chat/completions", json={"model": "gpt-4.1", "messages": []})
    assert info.value.status_code == 400 and len(info.value.attempts) == 1
    assert sum(four_nodes.counts().values()) == 1


def test_429_retry_after_keeps_traffic_away_for_that_long(four_nodes, make_client, clock):
    four_nodes.configure("a", rate_limit_rate=1.0, retry_after_s=2)
    client = make_client(four_nodes.client_nodes(), strategy="round_robin", clock=clock, sleep=clock.sleep)
    first = client.chat_completion(MSGS, model="m")
    assert first.attempts[0].node_id == "a" and first.attempts[0].status_code == 429
    assert first.node_id != "a"
    for _ in range(30):  # 1.9 s of (fake) time pass while others are up
        clock.advance(1.9 / 30)
        assert client.chat_completion(MSGS, model="m").node_id != "a"
    assert four_nodes.request_count("a", CHAT) == 1
    four_nodes.configure("a", rate_limit_rate=0.0)
    clock.advance(0.2)  # Retry-After has now passed
    served = {client.chat_completion(MSGS, model="m").node_id for _ in range(8)}
    assert "a" in served


def test_all_nodes_down_lists_one_entry_per_attempt(four_nodes, make_client):
    for node_id in "abcd":
        four_nodes.configure(node_id, fault="refuse")
    client = make_client(four_nodes.client_nodes(), max_retries=3, backoff_base_s=0.001)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    attempts = info.value.attempts
    assert len(attempts) == 4
    assert sorted(a.node_id for a in attempts) == ["a", "b", "c", "d"]
    assert all("APIConnectionError" in a.error for a in attempts)


def test_hanging_node_is_abandoned_at_its_read_timeout(four_nodes, make_client):
    four_nodes.configure("a", fault="hang")
    client = make_client(four_nodes.client_nodes(), strategy="round_robin",
                         read_timeout_s=1.0, deadline_s=3.0)
    t0 = time.monotonic()
    resp = client.chat_completion(MSGS, model="m")
    elapsed = time.monotonic() - t0
    assert resp.attempts[0].node_id == "a" and "APITimeoutError" in resp.attempts[0].error
    assert resp.node_id != "a"
    assert elapsed < 3.0 + 0.5


def test_deadline_bounds_a_call_when_every_node_hangs(four_nodes, make_client):
    for node_id in "abcd":
        four_nodes.configure(node_id, fault="hang")
    client = make_client(four_nodes.client_nodes(), read_timeout_s=1.0, deadline_s=3.0,
                         backoff_base_s=0.001)
    t0 = time.monotonic()
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0 + 0.5, "the deadline covers all attempts"
    assert 2 <= len(info.value.attempts) <= 4
    assert all("APITimeoutError" in a.error for a in info.value.attempts)


def test_32_threads_by_50_calls_counts_reconcile(four_nodes, make_client):
    four_nodes.configure("c", error_rate=0.2)
    four_nodes.configure("d", latency_ms=5)
    client = make_client(four_nodes.client_nodes(), backoff_base_s=0.001)
    outcomes = {"ok": 0, "typed": 0}
    lock = threading.Lock()

    def work(_):
        for _ in range(50):
            try:
                client.chat_completion(MSGS, model="m")
                key = "ok"
            except HolySheepError:
                key = "typed"
            with lock:
                outcomes[key] += 1

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(work, range(32)))
    assert outcomes["ok"] + outcomes["typed"] == 32 * 50
    stats = client.stats()
    assert stats["calls"] == 1600
    assert stats["successes"] == outcomes["ok"] and stats["failures"] == outcomes["typed"]
    assert stats["in_flight"] == 0
    sim = four_nodes.counts()
    for node_id, node_stats in stats["nodes"].items():
        # every attempt reached its node (none refused), so the two views agree exactly
        assert node_stats["requests"] == sim[node_id]
        done = node_stats["successes"] + sum(node_stats["failures"].values())
        assert done == node_stats["requests"]
    assert sum(n["successes"] for n in stats["nodes"].values()) == stats["successes"]


def test_deadline_holds_against_a_node_that_trickles_its_body(make_client):
    """Each byte arrives within the read timeout, but the whole body would take 10 s."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
            for _ in range(49):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = make_client([{"id": "slow", "base_url": f"http://127.0.0.1:{port}/v1"}], max_retries=0,
                         read_timeout_s=5.0, deadline_s=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(AllAttemptsFailedError) as info:
            client.chat_completion(MSGS, model="m")
    finally:
        stop.set()
        listener.close()
        server.join(5)
    assert time.monotonic() - t0 < 2.0
    assert "APITimeoutError" in info.value.attempts[0].error and "deadline" in info.value.attempts[0].error
