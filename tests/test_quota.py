"""Quota headers (x-ratelimit-*): every duration format, garbage ignored and counted,
and routing that stops sending to a node before it runs out. Fake clock."""

from __future__ import annotations

import math
import random

import pytest
from requests.structures import CaseInsensitiveDict

from holysheep_lb import Node
from holysheep_lb.nodes import EjectionPolicy, NodeState
from holysheep_lb.quota import NodeQuota, parse_count, parse_duration_s
from holysheep_lb.selection import Selector, make_strategy


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0),
    ("6m0s", 360.0),
    ("120ms", 0.12),
    ("1m30.5s", 90.5),
    ("0s", 0.0),
    ("2h1m1s", 7261.0),
    ("17ms", 0.017),
    ("250us", 0.00025),
    ("250µs", 0.00025),
    ("5ns", 5e-9),
    (".5s", 0.5),
    ("20", 20.0),        # a bare number: seconds
    ("1.5", 1.5),
    ("  3s ", 3.0),
])
def test_every_reset_format_parses(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", " ", "s", "1", "-1s", "1x", "1 s", "1s2s", "abc", "1m30.5", "nan", "inf", "1e3s", "1,5s",
    "9" * 80 + "s", "100000000h", None, 12, b"1s",
])
def test_garbage_durations_are_none(text):
    if text == "1":
        assert parse_duration_s(text) == 1.0  # a bare number is seconds, not garbage
        return
    assert parse_duration_s(text) is None


@pytest.mark.parametrize("text, value", [("600", 600), (" 0 ", 0), ("12x", None), ("-1", None), ("1.5", None),
                                         ("", None), ("١٢", None), ("9" * 30, None), (None, None)])
def test_counts(text, value):
    assert parse_count(text) == value


def _headers(limit="600", remaining="0", reset="6s", kind="requests"):
    return CaseInsensitiveDict({f"X-RateLimit-Limit-{kind}": limit, f"x-ratelimit-remaining-{kind}": remaining,
                                f"x-ratelimit-reset-{kind}": reset})


def test_a_reading_refills_continuously_and_counts_what_was_sent():
    q = NodeQuota()
    q.observe(_headers(limit="600", remaining="100", reset="50s"), now=0.0)  # 500 missing in 50 s: 10/s
    snap = q.snapshot(0.0)
    assert snap["requests"] == {"limit": 600, "remaining": 100, "reset_s": 50.0}
    assert q.snapshot(2.0)["requests"]["remaining"] == 120
    q.on_send()
    q.on_send()
    assert q.snapshot(2.0)["requests"]["remaining"] == 118
    assert q.snapshot(1000.0)["requests"]["remaining"] == 598  # full, less the two sent since
    assert q.headroom(0.0) == pytest.approx(98 / 600)


def test_nearly_spent_quota_blocks_until_it_refills():
    q = NodeQuota()
    q.observe(_headers(limit="600", remaining="0", reset="60s"), now=10.0)  # 10 per second
    assert q.blocked_until(10.0) == pytest.approx(10.2)  # 2 needed: one to send, one kept in reserve
    q.observe(_headers(limit="600", remaining="5", reset="59.5s"), now=11.0)
    assert q.blocked_until(11.0) < 11.0
    for _ in range(4):
        q.on_send()
    assert q.blocked_until(11.0) > 11.0  # 1 left, the reserve: stop before the node says 429


def test_pending_requests_count_as_spent():
    q = NodeQuota()
    q.observe(_headers(limit="600", remaining="3", reset="59.7s"), now=0.0, pending=2)
    assert q.snapshot(0.0)["requests"]["remaining"] == 1


def test_token_quota_blocks_near_zero():
    q = NodeQuota()
    q.observe(_headers(limit="100000", remaining="500", reset="59.7s", kind="tokens"), now=0.0)
    assert q.blocked_until(0.0) > 0.0  # under 2% of the limit left
    q.observe(_headers(limit="100000", remaining="50000", reset="30s", kind="tokens"), now=1.0)
    assert q.blocked_until(1.0) < 1.0
    assert q.snapshot(1.0)["tokens"]["remaining"] == 50000


@pytest.mark.parametrize("bad", [
    {"limit": "lots"}, {"remaining": "-3"}, {"reset": "soon"}, {"limit": "0"}, {"reset": "1s2s"},
    {"remaining": "1e9"}, {"limit": ""},
])
def test_garbage_headers_are_ignored_and_counted(bad):
    q = NodeQuota()
    q.observe(_headers(limit="600", remaining="300", reset="30s"), now=0.0)
    q.observe(_headers(**{**{"limit": "600", "remaining": "0", "reset": "60s"}, **bad}), now=1.0)
    assert q.garbage == 1
    assert q.snapshot(1.0)["requests"]["remaining"] == 310  # the good reading still stands
    assert q.snapshot(1.0)["garbage_headers"] == 1


def test_a_partial_set_of_headers_is_garbage_but_a_missing_reset_is_not():
    q = NodeQuota()
    q.observe({"x-ratelimit-remaining-requests": "3"}, now=0.0)
    assert q.garbage == 1 and q.readings == 0
    q.observe({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "30"}, now=0.0)
    assert q.garbage == 1 and q.readings == 1
    assert q.snapshot(0.0)["requests"]["remaining"] == 30


def test_answers_without_headers_change_nothing():
    q = NodeQuota()
    q.observe(None, now=0.0)
    q.observe({}, now=0.0)
    q.observe({"content-type": "application/json"}, now=0.0)
    assert q.readings == 0 and q.garbage == 0 and q.headroom(0.0) == 1.0
    assert q.blocked_until(5.0) < 5.0
    assert q.snapshot(0.0)["requests"] is None


class _NoTransport:
    def close(self):
        pass

    def cut_exchanges(self):
        return 0


def _selector(clock, strategy="adaptive", n=2):
    nodes = [NodeState(Node(id=f"n{i}", base_url=f"http://127.0.0.1:1/{i}"), _NoTransport()) for i in range(n)]
    return Selector(nodes, make_strategy(strategy), ejection=EjectionPolicy(jitter=0.0), clock=clock,
                    rand=random.Random(1).random)


@pytest.mark.parametrize("strategy", ["adaptive", "round_robin", "least_connections"])
def test_a_node_out_of_quota_gets_no_request_until_it_refills(clock, strategy):
    sel = _selector(clock, strategy)
    a, b = sel.nodes
    started = clock()
    node = sel.pick(started=started)
    sel.release_success(node, 10.0, started=started, quota_headers=_headers(limit="60", remaining="0", reset="60s"))
    spent = node
    other = b if spent is a else a
    assert spent.unusable_reason(clock()) == "quota"
    for _ in range(20):
        started = clock()
        assert sel.pick(started=started) is other
        sel.release_success(other, 10.0, started=started)
    clock.advance(2.0)  # refills one per second: two now
    assert spent.unusable_reason(clock()) is None
    assert {n["id"]: n["quota"]["requests"]["remaining"] for n in sel.snapshot() if n["quota"]["requests"]} == {
        spent.id: 2}


def test_adaptive_prefers_the_node_with_headroom(clock):
    sel = _selector(clock)
    a, b = sel.nodes
    for node, remaining in ((a, "10"), (b, "50")):
        started = clock()
        sel.pick(started=started)  # bookkeeping only: whichever node, release the one we read
        picked = next(n for n in sel.nodes if n.in_flight)
        sel.release_success(picked, 10.0, started=started)
        node.observe_quota(_headers(limit="60", remaining=remaining, reset="50s"), clock())
    for node in (a, b):
        started = clock()
        n = sel.pick(started=started)
        sel.release_success(n, 10.0, started=started)
    picks = []
    for _ in range(10):
        started = clock()
        n = sel.pick(started=started)
        picks.append(n.id)
        sel.release_success(n, 10.0, started=started)
    assert picks.count("n1") > picks.count("n0")


def test_every_node_out_of_quota_waits_for_the_soonest(clock):
    sel = _selector(clock, "round_robin")
    for node, reset in zip(sel.nodes, ("60s", "30s")):
        node.observe_quota(_headers(limit="60", remaining="0", reset=reset), clock())
    node = sel.pick(started=clock())
    assert node.id == "n1"  # refills twice as fast
    assert math.isclose(node.throttled_until - clock(), 1.0)
