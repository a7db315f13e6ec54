"""The Failover Bench scenarios, recreated by the simulated gateway's model settings."""

from __future__ import annotations

import pytest
import requests

from holysheep_lb.simulator import (
    SimNode,
    SimulatedGateway,
    failover_bench_models,
    reply_text,
)
from holysheep_lb.simulator.catalogue import PROMPT

from ..conftest import FakeClock, wait_until
from .sim_helpers import TIMEOUT, chat_url, content_of, parse, read_stream

MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def clock():
    return FakeClock()


@pytest.fixture(scope="module")
def gw(clock):
    with SimulatedGateway([SimNode("a")], models=failover_bench_models(fast=True), clock=clock) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(gw):
    gw.reset_counts()  # as the bench resets its wall before every scenario


def stream(gw, model, messages=MESSAGES):
    """(status, content, error, events) of one streamed call, as every scenario sends it."""
    resp = requests.post(chat_url(gw), json={"model": model, "messages": messages, "stream": True,
                                             "stream_options": {"include_usage": True}},
                         timeout=TIMEOUT, stream=True)
    if resp.status_code != 200:
        return resp.status_code, None, None, resp.json()
    payloads, error = read_stream(resp)
    try:
        events = parse(payloads)
    except ValueError:
        events = None
    return 200, content_of(events) if events else None, error, events


def test_every_scenario_has_a_model():
    models = failover_bench_models()
    assert len([m for m in models if m.startswith("fb-s")]) == 16
    assert models["fb-s06-no-response"].fault_duration_s == 120 and models["fb-s07-slow-ttft"].fault_duration_s == 20
    assert failover_bench_models(fast=True)["fb-s15-flap"].fault_duration_s == 6


@pytest.mark.parametrize("model, first, second", [
    ("fb-s01-429-retry-after", 429, 200),
    ("fb-s02-429-persistent", 429, 429),
    ("fb-s03-500-then-200", 500, 200),
    ("fb-s04-503-persistent", 503, 503),
    ("fb-s12-context-length", 400, 400),
    ("fb-s13-content-filter", 400, 400),
    ("fb-s16-503-persistent", 503, 503),
])
def test_status_scenarios(gw, model, first, second):
    assert [stream(gw, model)[0] for _ in range(2)] == [first, second]
    assert stream(gw, "fb-ok")[1] == reply_text("fb-ok", MESSAGES)
    assert gw.attempts(model) == 2


def test_s05_reset_then_answer(gw):
    with pytest.raises(requests.exceptions.ConnectionError):
        stream(gw, "fb-s05-reset")
    assert stream(gw, "fb-s05-reset")[1] == reply_text("fb-s05-reset", MESSAGES)


def test_s08_and_s14_a_cut_stream_and_a_fallback_that_rejects_the_prefill(gw):
    status, partial, error, _ = stream(gw, "fb-s14-stream-cut")
    assert status == 200 and error is not None and len(partial.split()) == 12
    continued = MESSAGES + [{"role": "assistant", "content": partial}]
    status, _, _, rejected = stream(gw, "fb-ok-noprefill", continued)
    assert status == 400 and "prefill" in rejected["error"]["message"]
    assert stream(gw, "fb-ok-noprefill")[1] == reply_text("fb-ok-noprefill", MESSAGES)  # a clean restart works
    _, rest, error, _ = stream(gw, "fb-ok", continued)
    assert error is None and partial + rest == reply_text("fb-s14-stream-cut", MESSAGES)
    expected = ["stream_cut", "prefill_rejected", "ok", "ok"]
    assert wait_until(lambda: [r.outcome for r in gw.request_log()] == expected), gw.request_log()


def test_s10_and_s11_malformed_event_and_no_done(gw):
    resp = requests.post(chat_url(gw), json={"model": "fb-s10-malformed-chunk", "messages": MESSAGES,
                                             "stream": True}, timeout=TIMEOUT, stream=True)
    payloads, error = read_stream(resp)
    assert error is None and payloads[-1] == b"[DONE]" and len(payloads) == 1 + 19 + 1 + 1 + 1
    _, _, error, events = stream(gw, "fb-s11-no-done")
    assert error is None and "[DONE]" not in events and events[-1]["usage"]["completion_tokens"] == 19


def test_s15_the_primary_flaps_from_reset(gw, clock):
    assert stream(gw, "fb-s15-flap")[0] == 503
    clock.advance(6)
    assert stream(gw, "fb-s15-flap")[0] == 200
