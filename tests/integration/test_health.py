"""The /models health checker: thresholds, resilience, shutdown, and fork safety."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from holysheep_lb import Client

MSGS = [{"role": "user", "content": "ping"}]


def _wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(0.01)
    return predicate()


def test_down_after_n_failed_probes_and_up_after_m_good_ones(four_nodes, make_client):
    client = make_client(four_nodes.client_nodes(), unhealthy_threshold=3, healthy_threshold=2,
                         health_check_timeout_s=0.5)
    checker = client._health or None
    assert checker is None  # the fixture disables the thread; drive a checker by hand
    from holysheep_lb.health import HealthChecker
    checker = HealthChecker(client.selector, interval_s=1, timeout_s=0.5, unhealthy_threshold=3,
                            healthy_threshold=2)
    four_nodes.configure("b", fault="refuse")
    state = lambda: {n["id"]: n for n in client.nodes()}["b"]  # noqa: E731
    checker.probe_all()
    checker.probe_all()
    assert state()["usable"] and state()["last_probe_ok"] is False
    checker.probe_all()
    assert state()["reason"] == "down"
    assert {client.chat_completion(MSGS, model="m").node_id for _ in range(12)} <= {"a", "c", "d"}
    four_nodes.configure("b", fault=None)
    checker.probe_all()
    assert state()["reason"] == "down"  # one good probe is not enough (the seed's defect)
    checker.probe_all()
    assert state()["usable"] and state()["probe_latency_ms"] is not None
    assert (state()["probes"], state()["probe_failures"]) == (5, 3)
    assert four_nodes.request_count("b", "/v1/models") == 2


def test_probe_that_raises_never_kills_the_thread(four_nodes, make_client):
    client = make_client(four_nodes.client_nodes(), health_check_interval_s=0.01)
    checker = client.health_checker
    assert checker is not None and checker.running

    def explode(*a, **kw):
        raise RuntimeError("probe bug")

    client.selector.by_id["a"].transport.send = explode
    assert _wait_until(lambda: checker.loop_errors >= 3)
    rounds = checker.rounds
    assert _wait_until(lambda: checker.rounds > rounds + 2)
    assert checker.running
    health = client.stats()["health"]
    assert health["probe_errors_raised"] >= 3 and health["rounds"] >= rounds + 2


def test_close_stops_the_thread_within_a_second(four_nodes):
    client = Client(nodes=four_nodes.client_nodes(), health_check_interval_s=0.05)
    checker = client.health_checker
    assert _wait_until(lambda: checker.rounds >= 1)
    t0 = time.monotonic()
    client.close()
    assert not checker.running
    assert time.monotonic() - t0 < 1.5


def test_health_probes_feed_latency_to_the_strategies(four_nodes, make_client):
    four_nodes.configure("a", latency_ms=40)
    client = make_client(four_nodes.client_nodes())
    from holysheep_lb.health import HealthChecker
    HealthChecker(client.selector, interval_s=1, timeout_s=1, unhealthy_threshold=3,
                  healthy_threshold=2).probe_all()
    probe = {n["id"]: n["probe_latency_ms"] for n in client.nodes()}
    assert probe["a"] >= 35 and all(probe[k] < 35 for k in "bcd")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_fresh_locks_sessions_and_its_own_health_thread(four_nodes):
    client = Client(nodes=four_nodes.client_nodes(), health_check_interval_s=0.05)
    assert client.chat_completion(MSGS, model="m")  # the parent has pooled connections now
    held = threading.Event()
    release = threading.Event()

    def hold_state_lock():
        with client.selector._state_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_state_lock, daemon=True)
    holder.start()
    assert held.wait(5)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not deadlock on the lock the parent's thread holds
        code = 1
        try:
            signal.alarm(20)
            os.close(read_fd)
            resp = client.chat_completion(MSGS, model="m")
            started = _wait_until(lambda: client.health_checker.running, 5)
            ok = resp.text.startswith("[m]") and started and client.stats()["in_flight"] == 0
            os.write(write_fd, b"ok" if ok else b"bad")
            client.close()
            code = 0
        finally:
            os._exit(code)
    release.set()
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "child did not finish"
            threading.Event().wait(0.02)
        answer = os.read(read_fd, 16)
    finally:
        os.close(read_fd)
        client.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert answer == b"ok"
