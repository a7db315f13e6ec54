"""The call's deadline holds from connect to the last byte, headers included.

Each node here sends its answer one byte at a time, so that no single read ever waits
longer than the read timeout: only the deadline can end the exchange early.
"""

from __future__ import annotations

import threading
import time

import pytest

from holysheep_lb import Client
from holysheep_lb.errors import AllAttemptsFailedError, APITimeoutError
from holysheep_lb.health import HealthChecker

from ..conftest import API_KEY, chat_body, wait_until
from .slow_server import SlowServer, json_answer, sse_answer
from .test_transport_security import self_signed  # noqa: F401 - a fixture

MSGS = [{"role": "user", "content": "hi"}]
TRICKLE_S = 0.02  # per byte: the head alone (~300 bytes with its padding) takes ~6 s
PADDING = 200


def _client(server, **kw):
    kw.setdefault("health_check_interval_s", None)
    kw.setdefault("max_retries", 0)
    return Client(api_key=API_KEY, nodes=[{"id": "slow", "base_url": server.base_url}], **kw)


def _timed_failure(call):
    started = time.monotonic()
    with pytest.raises(AllAttemptsFailedError) as info:
        call()
    return time.monotonic() - started, info.value


@pytest.mark.parametrize("per_call", [False, True])
def test_a_node_trickling_its_headers_cannot_hold_a_call_past_its_deadline(per_call):
    with SlowServer(json_answer(chat_body("m"), head_padding=PADDING), byte_interval_s=TRICKLE_S) as server:
        options = {} if per_call else {"deadline_s": 0.5}
        with _client(server, read_timeout_s=0.3, **options) as client:
            took, error = _timed_failure(
                lambda: client.chat_completion(MSGS, model="m", **({"deadline_s": 0.5} if per_call else {})))
    assert took < 1.5, took  # ~6 s without the deadline
    assert isinstance(error.last_error, APITimeoutError) and error.attempts[0].kind == "timeout"
    assert "deadline passed while the response was arriving" in str(error.last_error)
    assert error.last_error.request_sent is True


def test_a_node_trickling_over_tls_is_cut_at_the_deadline_too(self_signed):  # noqa: F811
    cert_path, context = self_signed
    answer = json_answer(chat_body("m"), head_padding=PADDING)
    with SlowServer(answer, byte_interval_s=TRICKLE_S, tls=context) as server:
        with _client(server, read_timeout_s=0.3, deadline_s=0.5, verify=cert_path) as client:
            took, error = _timed_failure(lambda: client.chat_completion(MSGS, model="m"))
    assert took < 1.5, took
    assert isinstance(error.last_error, APITimeoutError), error


@pytest.mark.parametrize("limit", ["deadline_s", "stream_first_chunk_timeout_s"])
def test_a_stream_gets_its_headers_and_first_chunk_within_the_first_chunk_timeout_and_the_deadline(limit):
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    with SlowServer(sse_answer([chunk], head_padding=PADDING), byte_interval_s=TRICKLE_S) as server:
        with _client(server, read_timeout_s=0.3, **{limit: 0.5}) as client:
            took, error = _timed_failure(lambda: client.chat_completion(MSGS, model="m", stream=True))
    assert took < 1.5, took
    assert isinstance(error.last_error, APITimeoutError), error


def test_a_deadline_that_does_not_pass_leaves_the_connection_to_the_next_call():
    with SlowServer(json_answer(chat_body("m"))) as server:
        with _client(server, deadline_s=0.2) as client:
            for _ in range(3):
                assert client.chat_completion(MSGS, model="m").text == "hi"
            # the first call's deadline has long passed: its watch ended with it
            assert client.chat_completion(MSGS, model="m", deadline_s=5).text == "hi"
        assert server.accepted == 1  # one keep-alive connection, never cut


def test_one_slow_node_does_not_delay_the_probes_of_the_others():
    models = json_answer({"object": "list", "data": []}, head_padding=PADDING)
    with SlowServer(models, byte_interval_s=TRICKLE_S) as slow, \
            SlowServer(models) as fast:
        nodes = [{"id": "slow", "base_url": slow.base_url}, {"id": "fast", "base_url": fast.base_url}]
        with Client(api_key=API_KEY, nodes=nodes, health_check_interval_s=None) as client:
            checker = HealthChecker(client.selector, interval_s=10, timeout_s=1.0, unhealthy_threshold=1,
                                    healthy_threshold=1)
            recorded = {}
            record = client.selector.record_probe
            lock = threading.Lock()

            def recording(node, ok, *args, **kwargs):
                with lock:
                    recorded[node.id] = (ok, time.monotonic() - started)
                return record(node, ok, *args, **kwargs)

            client.selector.record_probe = recording
            started = time.monotonic()
            checker.probe_all()
            took = time.monotonic() - started
            state = {n["id"]: n for n in client.nodes()}
    assert recorded["fast"][0] is True and recorded["fast"][1] < 0.5, recorded  # not after the slow one
    assert recorded["slow"][0] is False and 0.9 <= recorded["slow"][1] < 2.0, recorded  # its 1 s timeout
    assert took < 2.5, took  # ~6 s if the slow node's headers were not bounded
    assert state["slow"]["reason"] == "down" and state["fast"]["usable"]


def test_a_node_whose_probe_is_still_running_is_not_probed_twice_at_once():
    with SlowServer(json_answer({"object": "list", "data": []})) as server:
        nodes = [{"id": "stuck", "base_url": server.base_url}, {"id": "fine", "base_url": server.base_url}]
        with Client(api_key=API_KEY, nodes=nodes, health_check_interval_s=None) as client:
            release = threading.Event()
            stuck_calls = []
            stuck = client.selector.by_id["stuck"].transport
            real_send = stuck.send

            def never_ending_send(*args, **kwargs):  # a probe that outlives its own timeout
                stuck_calls.append(1)
                release.wait(5.0)
                return real_send(*args, **kwargs)

            stuck.send = never_ending_send
            checker = HealthChecker(client.selector, interval_s=10, timeout_s=0.05, unhealthy_threshold=3,
                                    healthy_threshold=1)
            try:
                checker.probe_all()  # returns after its timeout's margin, the stuck probe still running
                checker.probe_all()
            finally:
                release.set()
            assert wait_until(lambda: "stuck" not in checker._probing, 5.0)
            probes = {n["id"]: n["probes"] for n in client.nodes()}
    assert len(stuck_calls) == 1 and probes == {"stuck": 1, "fine": 2}
    assert checker.rounds == 2
