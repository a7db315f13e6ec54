"""Routing strategies, ejection, throttling and panic mode, on a fake clock."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from holysheep_lb import ConfigError, Node, RoutingStrategy, Strategy
from holysheep_lb.concurrency import ConcurrencyLimit
from holysheep_lb.nodes import EjectionPolicy, NodeState
from holysheep_lb.selection import Adaptive, Selector, make_strategy



class _NoTransport:
    def close(self):
        pass


def _states(spec):
    return [NodeState(Node(id=i, base_url=f"http://127.0.0.1:1/{i}", region=r, weight=w), _NoTransport())
            for i, r, w in spec]


def _selector(spec, strategy, clock, *, rand=None, **kw):
    kw.setdefault("ejection", EjectionPolicy(after_failures=5, base_s=30, max_s=300, jitter=0.0))
    return Selector(_states(spec), make_strategy(strategy), clock=clock,
                    rand=rand or random.Random(3).random, **kw)


def _pick_and_succeed(sel, latency_ms=10.0, **kw):
    started = sel.clock()
    node = sel.pick(started=started, **kw)
    sel.release_success(node, latency_ms, started=started)
    return node.id


def test_round_robin_rotates_over_a_window(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1), ("c", "x", 1)], "round_robin", clock)
    assert [_pick_and_succeed(sel) for _ in range(9)] == list("abcabcabc")


def test_round_robin_skips_unusable_and_keeps_rotating(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1), ("c", "x", 1)], "round_robin", clock)
    sel.by_id["b"].throttled_until = clock() + 5
    assert [_pick_and_succeed(sel) for _ in range(4)] == list("acac")


def test_smooth_weighted_exact_sequence_5_1_1(clock):
    sel = _selector([("a", "x", 5), ("b", "x", 1), ("c", "x", 1)], "weighted", clock)
    picks = [_pick_and_succeed(sel) for _ in range(21)]
    assert "".join(picks[:7]) == "aabacaa"
    for start in range(0, 21, 7):  # exact shares in every window of sum(weights) picks
        assert Counter(picks[start:start + 7]) == {"a": 5, "b": 1, "c": 1}


def test_smooth_weighted_any_window(clock):
    sel = _selector([("a", "x", 3), ("b", "x", 2), ("c", "x", 1)], "weighted", clock)
    picks = [_pick_and_succeed(sel) for _ in range(60)]
    for start in range(0, 60, 6):
        assert Counter(picks[start:start + 6]) == {"a": 3, "b": 2, "c": 1}


def test_least_connections_prefers_fewest_in_flight_and_spreads_ties(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1), ("c", "x", 1)], "least_connections", clock)
    held = [sel.pick() for _ in range(3)]
    assert sorted(n.id for n in held) == ["a", "b", "c"]  # one each, never two on one node
    sel.release_success(held[1], 1.0, started=clock())
    assert sel.pick().id == held[1].id
    # ties are not always broken in favour of the first node
    sel2 = _selector([("a", "x", 1), ("b", "x", 1), ("c", "x", 1)], "least_connections", clock)
    firsts = Counter(_pick_and_succeed(sel2) for _ in range(300))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 50


def test_geographic_same_region_first_then_nearest_by_measured_latency(clock):
    sel = _selector([("us1", "us-east", 1), ("eu1", "eu-west", 1), ("ap1", "ap-southeast", 1)],
                    "geographic", clock)
    sel.by_id["us1"].observe_probe(80.0)
    sel.by_id["eu1"].observe_probe(20.0)
    sel.by_id["ap1"].observe_probe(150.0)
    assert {_pick_and_succeed(sel, region="ap-southeast") for _ in range(5)} == {"ap1"}
    sel.by_id["ap1"].throttled_until = clock() + 10  # its region has no usable node now
    assert _pick_and_succeed(sel, region="ap-southeast") == "eu1"  # nearest by probe latency
    assert _pick_and_succeed(sel, region="eu-west") == "eu1"


def test_geographic_unknown_region_falls_back_and_says_so(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="holysheep_lb")
    sel = _selector([("us1", "us-east", 1), ("eu1", "eu-west", 1)], "geographic", clock)
    sel.by_id["us1"].observe_probe(30.0)
    sel.by_id["eu1"].observe_probe(90.0)
    assert _pick_and_succeed(sel, region="mars-north") == "us1"
    assert "no node in region 'mars-north'" in caplog.text


def test_adaptive_moves_traffic_off_a_slowed_node_and_back(clock):
    """Node 'a' goes from 30 ms to 600 ms; later it recovers. Simulated on a fake clock."""
    sel = _selector([("a", "x", 1), ("b", "x", 1), ("c", "x", 1), ("d", "x", 1)], "adaptive", clock,
                    rand=random.Random(11).random)
    latency = {"a": 30.0, "b": 30.0, "c": 30.0, "d": 30.0}

    def run(calls, concurrency=4):
        """``concurrency`` calls in flight at a time; each takes its node's latency."""
        picks = []
        for _ in range(calls // concurrency):
            started = clock()
            batch = [sel.pick(started=started) for _ in range(concurrency)]
            clock.advance(max(latency[n.id] for n in batch) / 1000.0)
            for n in batch:
                sel.release_success(n, latency[n.id], started=started)
                picks.append(n.id)
        return picks

    run(200)
    latency["a"] = 600.0
    after = run(100)
    assert after.count("a") / len(after) < 0.10, Counter(after)
    # recovery: within 30 s of (fake) traffic its share is back above 15%
    latency["a"] = 30.0
    shares = []
    t_start = clock()
    while clock() - t_start < 30.0:
        window = run(100)
        shares.append(window.count("a") / len(window))
        if shares[-1] > 0.15:
            break
    assert shares[-1] > 0.15, shares


def test_adaptive_cold_node_starts_pessimistic_and_failures_are_penalised(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], Adaptive(explore_rate=0.0), clock)
    a, b = sel.by_id["a"], sel.by_id["b"]
    a.observe_latency(50.0, clock())
    assert a.latency_estimate_ms(clock()) < b.latency_estimate_ms(clock())  # cold b: pessimistic
    assert _pick_and_succeed(sel) == "a"
    node = sel.pick()
    sel.release_failure(node, "status_5xx", 5.0, started=clock())  # a fast failure is not a fast node
    assert a.latency_estimate_ms(clock()) >= 250.0


@pytest.mark.parametrize("strategy", ["adaptive", "geographic", "least_connections"])
def test_an_outage_under_load_leaves_estimates_finite_and_routing_working(clock, strategy):
    # 2,000 instant failures per node (every node refusing, calls still pouring in in panic
    # mode) once overflowed the doubled failure penalty to inf and NaN: pick() then raised
    # a bare ValueError forever after, even once the nodes were back.
    sel = _selector([("a", "x", 1), ("b", "y", 1)], strategy, clock)
    for _ in range(2000):
        for node in sel.nodes:
            sel.pick(exclude=[n.id for n in sel.nodes if n is not node], started=clock())
            sel.release_failure(node, "connect", 0.5, started=clock())
        clock.advance(0.001)
    for node in sel.nodes:
        assert 250.0 <= node.latency_estimate_ms(clock()) <= 600_000.0
        assert 0.0 < node.typical_latency_ms(clock()) <= 600_000.0
    clock.advance(60)  # ejections over; the nodes answer again
    assert {_pick_and_succeed(sel) for _ in range(20)} <= {"a", "b"}


def test_custom_strategy_class_and_enum(clock):
    class AlwaysLast(Strategy):
        name = "last"

        def choose(self, candidates, ctx):
            return candidates[-1]

    sel = Selector(_states([("a", "x", 1), ("b", "x", 1)]), make_strategy(AlwaysLast),
                   ejection=EjectionPolicy(), clock=clock)
    assert _pick_and_succeed(sel) == "b"
    assert make_strategy(RoutingStrategy.WEIGHTED).name == "weighted"
    with pytest.raises(ConfigError, match="strategy"):
        make_strategy("nope")


def test_ejection_trial_readmission_and_longer_second_ejection(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "round_robin", clock)
    a = sel.by_id["a"]
    for _ in range(4):
        n = sel.pick(exclude=["b"])
        sel.release_failure(n, "connect", 1.0, started=clock())
    assert a.unusable_reason(clock()) is None  # 4 < 5
    n = sel.pick(exclude=["b"])
    sel.release_failure(n, "status_5xx", 1.0, started=clock())
    assert a.unusable_reason(clock()) == "ejected" and a.times_ejected == 1
    assert {_pick_and_succeed(sel) for _ in range(5)} == {"b"}
    clock.advance(30.0)  # base 30 s x 1
    trial = sel.pick(exclude=["b"])
    assert trial.id == "a" and a.trial_in_flight
    assert a.unusable_reason(clock()) == "half-open trial in flight"  # only one trial at a time
    assert sel.pick().id == "b"
    sel.release_success(sel.by_id["b"], 1.0, started=clock())
    sel.release_failure(trial, "timeout", 1.0, started=clock())  # the trial failed: ejected again, longer
    assert a.times_ejected == 2 and a.ejected_until == pytest.approx(clock() + 60.0)
    clock.advance(60.0)
    trial = sel.pick(exclude=["b"])
    sel.release_success(trial, 12.0, started=clock())
    assert a.unusable_reason(clock()) is None and a.ejected_until is None


def test_ejection_is_capped_and_jittered():
    policy = EjectionPolicy(after_failures=5, base_s=30, max_s=300, jitter=0.1)
    assert policy.duration_s(2, rand=0.5) == pytest.approx(60)
    assert policy.duration_s(50, rand=0.5) == pytest.approx(300)
    assert policy.duration_s(50, rand=1.0) == pytest.approx(330)
    assert policy.duration_s(1, rand=0.0) == pytest.approx(27)


def test_429_throttles_without_ejecting(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "round_robin", clock)
    a = sel.by_id["a"]
    for _ in range(20):
        n = sel.pick(exclude=["b"])
        sel.release_failure(n, "status_429", 1.0, started=clock(), retry_after_s=2.0)
    assert a.times_ejected == 0 and a.ejected_until is None
    assert a.unusable_reason(clock()) == "throttled"
    clock.advance(2.0)
    assert a.unusable_reason(clock()) is None


def test_4xx_does_not_count_towards_ejection(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "round_robin", clock)
    for _ in range(10):
        sel.release_failure(sel.pick(exclude=["b"]), "status_4xx", 1.0, started=clock())
    assert sel.by_id["a"].times_ejected == 0


def test_slow_start_ramps_a_readmitted_node(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "weighted", clock,
                    ejection=EjectionPolicy(after_failures=1, base_s=10, jitter=0.0, slow_start_s=100))
    sel.release_failure(sel.pick(exclude=["b"]), "connect", 1.0, started=clock())
    clock.advance(10.0)
    sel.release_success(sel.pick(exclude=["b"]), 1.0, started=clock())  # re-admitted through the trial
    a = sel.by_id["a"]
    assert a.effective_weight(clock(), 100) == pytest.approx(0.1)
    clock.advance(50)
    assert a.effective_weight(clock(), 100) == pytest.approx(0.55)
    clock.advance(50)
    assert a.effective_weight(clock(), 100) == pytest.approx(1.0)


def test_panic_mode_spreads_over_all_nodes_and_logs(clock, caplog):
    caplog.set_level(logging.WARNING, logger="holysheep_lb")
    sel = _selector([(c, "x", 1) for c in "abcd"], "round_robin", clock)
    for node_id in "abc":
        sel.by_id[node_id].down = True
    picks = Counter(_pick_and_succeed(sel) for _ in range(40))
    assert picks == {"a": 10, "b": 10, "c": 10, "d": 10}  # not 40 on the survivor
    assert "panic mode on: 1 of 4 nodes usable" in caplog.text
    sel.by_id["a"].down = sel.by_id["b"].down = False  # 3 of 4 usable again
    assert {_pick_and_succeed(sel) for _ in range(6)} == {"a", "b", "d"}
    assert "panic mode off" in caplog.text


def test_panic_threshold_zero_never_panics(clock):
    sel = _selector([(c, "x", 1) for c in "abcd"], "round_robin", clock, panic_threshold=0.0)
    for node_id in "abc":
        sel.by_id[node_id].down = True
    assert {_pick_and_succeed(sel) for _ in range(8)} == {"d"}


def test_in_flight_pairs_exactly(clock):
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "least_connections", clock)
    held = [sel.pick() for _ in range(10)]
    assert sel.total_in_flight() == 10
    for i, n in enumerate(held):
        if i % 3 == 0:
            sel.release_success(n, 1.0, started=clock())
        elif i % 3 == 1:
            sel.release_failure(n, "connect", 1.0, started=clock())
        else:
            sel.release_cancelled(n, started=clock())
    assert sel.total_in_flight() == 0
    assert all(n.awaiting == 0 and n.awaiting_started_sum == 0.0 for n in sel.nodes)


def test_adaptive_sees_a_hang_before_any_timeout_fires(clock):
    """Unanswered requests age: a node that stopped answering loses traffic at once."""
    sel = _selector([("a", "x", 1), ("b", "x", 1)], Adaptive(explore_rate=0.0), clock)
    for node_id in "ab":
        sel.by_id[node_id].observe_latency(40.0, clock())
    stuck = [sel.pick(exclude=["b"], started=clock()) for _ in range(3)]
    assert {n.id for n in stuck} == {"a"}
    clock.advance(0.5)  # a has answered nothing for 500 ms; b answers in 40 ms
    picks = []
    for _ in range(20):
        n = sel.pick(started=clock())
        picks.append(n.id)
        clock.advance(0.01)
        sel.release_success(n, 40.0, started=clock() - 0.01)
    assert picks.count("a") == 0
    assert sel.by_id["a"].latency_estimate_ms(clock()) >= 500.0  # its requests have waited 700 ms
    for n in stuck:
        sel.release_failure(n, "timeout", 700.0, started=1000.0)
    assert sel.by_id["a"].awaiting == 0 and sel.by_id["a"].awaiting_started_sum == 0.0


def test_answered_stream_stops_waiting_but_stays_in_flight(clock):
    sel = _selector([("a", "x", 1)], "adaptive", clock)
    sel.by_id["a"].observe_latency(25.0, clock())
    t0 = clock()
    n = sel.pick(started=t0)
    sel.answered(n, t0)
    clock.advance(30.0)  # a long stream: in flight, but not a sign of a slow node
    assert n.in_flight == 1 and n.awaiting == 0
    assert n.latency_estimate_ms(clock()) < 1000.0
    sel.release_success(n, 25.0, started=None)
    assert n.in_flight == 0


def test_only_the_trial_decides_an_ejected_node(clock):
    """A request sent before the ejection neither re-admits nor re-ejects the node."""
    sel = _selector([("a", "x", 1), ("b", "x", 1)], "round_robin", clock)
    a = sel.by_id["a"]
    old_started = clock()
    old = sel.pick(exclude=["b"], started=old_started)  # slow request, sent while a was fine
    for _ in range(5):
        t = clock()
        sel.release_failure(sel.pick(exclude=["b"], started=t), "connect", 1.0, started=t)
    assert a.ejected_until is not None and a.times_ejected == 1
    sel.release_success(old, 900.0, started=old_started)  # arrives late: not a trial
    assert a.ejected_until is not None, "a late success must not re-admit an ejected node"
    clock.advance(30.0)
    clock.advance(0.001)
    trial_started = clock()
    trial = sel.pick(exclude=["b"], started=trial_started)
    assert a.trial_in_flight and trial.id == "a"
    stray = clock() + 0.5  # some other attempt's release, not the trial's
    a.in_flight += 1
    a.start_waiting(stray)
    sel.release_cancelled(a, started=stray)
    assert a.trial_in_flight, "only the trial's own release ends the trial"
    sel.release_success(trial, 10.0, started=trial_started)
    assert a.ejected_until is None and not a.trial_in_flight
    assert a.in_flight == 0 and a.awaiting == 0


class _RecordingLimit(ConcurrencyLimit):
    __slots__ = ("seen",)

    def observe(self, in_flight, latency_ms, now):
        self.seen.append((in_flight, latency_ms))
        super().observe(in_flight, latency_ms, now)


def _recording_selector(clock):
    """One node whose concurrency learner records the samples it is taught: (selector, node, samples)."""
    sel = _selector([("a", "x", 1)], "least_connections", clock)
    node = sel.by_id["a"]
    node.concurrency = _RecordingLimit()
    node.concurrency.seen = []
    return sel, node, node.concurrency.seen


def test_an_answer_teaches_the_load_it_was_sent_into_not_the_one_it_returns_to(clock):
    # A slow answer collects requests while it runs; judged at the load it returns to,
    # slow answers would look like queueing and teach a false concurrency limit.
    sel, node, seen = _recording_selector(clock)
    first = clock()
    sel.pick(started=first)
    later = []
    for _ in range(5):
        clock.advance(0.01)
        later.append(clock())
        sel.pick(started=later[-1])
    sel.release_success(node, 500.0, started=first)  # returns to 5 others in flight
    for started in later:
        sel.release_success(node, 20.0, started=started)
    assert seen == [(1, 500.0), (2, 20.0), (3, 20.0), (4, 20.0), (5, 20.0), (6, 20.0)]
    assert node.in_flight == 0 and not node._sent_load


def test_attempts_sent_at_one_clock_reading_each_keep_their_load(clock):
    # a coarse clock gives several attempts the same start time: first sent, first answered
    sel, node, seen = _recording_selector(clock)
    started = clock()
    for _ in range(3):
        sel.pick(started=started)
    for _ in range(3):
        sel.release_success(node, 10.0, started=started)
    assert [load for load, _ in seen] == [1, 2, 3]
    assert not node._sent_load


def test_a_stream_teaches_the_load_it_was_sent_into_when_it_ends(clock):
    sel, node, seen = _recording_selector(clock)
    started = clock()
    sel.pick(started=started)
    sel.pick(started=clock() + 1.0)  # a second request sent after it, before it ends
    load = sel.answered(node, started)  # first chunk: no longer waiting; its send load comes back
    sel.release_success(node, 10.0, started=None, sent_load=load)
    assert seen == [(1, 10.0)] and list(node._sent_load) == [clock() + 1.0]


def test_adaptive_gives_a_slower_node_that_decayed_into_the_band_one_request_at_a_time(clock):
    # A 52 ms region beside a 40 ms one: out of the band (1.25 x 40 = 50). After a second
    # and a half without samples its estimate has decayed into the band, before it counts
    # as stale (2 s): it gets one trial at a time, not a burst carrying its slower tail.
    sel = _selector([("fast", "x", 1), ("slow", "x", 1)], Adaptive(explore_rate=0.0), clock)
    fast, slow = sel.by_id["fast"], sel.by_id["slow"]
    for node, latency in ((fast, 40.0), (slow, 52.0)):
        for _ in range(30):
            started = clock()
            sel.pick(started=started, exclude={"slow" if node is fast else "fast"})
            sel.release_success(node, latency, started=started)
    assert slow.typical_latency_ms(clock()) > 1.25 * fast.typical_latency_ms(clock())
    for _ in range(15):  # 1.5 s of traffic answered by the fast node only
        clock.advance(0.1)
        for _ in range(5):
            started = clock()
            node = sel.pick(started=started, exclude={"slow"})
            sel.release_success(node, 40.0, started=started)
    assert slow.typical_latency_ms(clock()) < 1.25 * fast.typical_latency_ms(clock())  # decayed in
    picks = [sel.pick(started=clock()) for _ in range(32)]  # 32 callers at once
    assert sum(n is slow for n in picks) == 1


@pytest.mark.parametrize("gap_s", [0.001, 0.5, 2.0])
def test_latency_averages_are_not_biased_by_time_between_samples(clock, gap_s):
    # Time without samples lowers an estimate when it is read (a slow node gets tried
    # again); it must not leak into the averages themselves, or a sparsely sampled
    # node reads faster than it is (about half at one sample per 2 s).
    node = _states([("a", "x", 1)])[0]
    for _ in range(200):
        clock.advance(gap_s)
        node.observe_latency(60.0, clock())
    assert node.typical_latency_ms(clock(), decayed=False) == pytest.approx(60.0, rel=0.01)
    assert node.latency_estimate_ms(clock()) == pytest.approx(60.0, rel=0.01)
