"""Hang detection and one-at-a-time exploration, on a fake clock."""

from __future__ import annotations

import random

import pytest

from holysheep_lb import ConfigError, Node
from holysheep_lb.nodes import EjectionPolicy, HangPolicy, NodeState
from holysheep_lb.selection import Adaptive, Selector, make_strategy


class _Transport:
    """Records the cuts the selector asks for (each cut frees ``stuck`` calls)."""

    def __init__(self) -> None:
        self.cuts = 0
        self.stuck = 0

    def close(self) -> None:
        pass

    def cut_exchanges(self) -> int:
        self.cuts += 1
        return self.stuck


def _selector(clock, strategy, ids=("a", "b", "c"), **kw):
    nodes = [NodeState(Node(id=i, base_url=f"http://127.0.0.1:1/{i}"), _Transport()) for i in ids]
    kw.setdefault("ejection", EjectionPolicy(jitter=0.0))
    kw.setdefault("hang", HangPolicy(watch_interval_s=None, min_waiting=1))  # picks only: the fake clock decides
    return Selector(nodes, make_strategy(strategy) if isinstance(strategy, str) else strategy, clock=clock,
                    rand=random.Random(5).random, **kw)


def _warm(sel, clock, latency_ms=20.0, rounds=30):
    """Give every node ``rounds`` successes at ``latency_ms``."""
    for node in sel.nodes:
        for _ in range(rounds):
            started = clock()
            node.in_flight += 1
            node.start_waiting(started)
            sel.release_success(node, latency_ms, started=started)


def _pick_release(sel, clock, latency_ms=20.0):
    started = clock()
    node = sel.pick(started=started)
    sel.release_success(node, latency_ms, started=started)
    return node


def test_exploration_never_has_two_requests_in_flight_on_a_stale_node(clock):
    sel = _selector(clock, Adaptive(explore_rate=1.0, explore_after_s=2.0))  # every pick may explore
    _warm(sel, clock)
    a, b, c = sel.nodes
    clock.advance(1.0)
    for node in (a, c):  # a and c fresh, b stale
        _pick_release(sel, clock) if False else None
        started = clock()
        node.in_flight += 1
        node.start_waiting(started)
        sel.release_success(node, 20.0, started=started)
    clock.advance(1.5)
    b.last_sample_at = clock() - 10.0
    held = []
    most_on_b = 0
    for _ in range(50):  # nothing answers: every pick stays in flight
        started = clock()
        held.append((sel.pick(started=started), started))
        most_on_b = max(most_on_b, b.in_flight)
        clock.advance(0.01)
    assert most_on_b == 1
    assert sum(1 for n, _ in held if n is b) == 1


def test_a_hung_node_gets_no_new_call_once_its_oldest_request_is_past_the_threshold(clock):
    sel = _selector(clock, "round_robin")
    _warm(sel, clock, latency_ms=20.0)
    a, b, c = sel.nodes
    threshold_s = b.hang_threshold_s(sel.hang)
    assert threshold_s == pytest.approx(0.25)  # 4 x 20 ms is below the floor
    # b takes a call and never answers; a and c keep answering
    picks = []
    stuck_at = None
    for _ in range(30):
        started = clock()
        node = sel.pick(started=started)
        picks.append(node.id)
        if node is b:
            if stuck_at is None:
                stuck_at = started
            continue  # left unanswered
        sel.release_success(node, 20.0, started=started)
        clock.advance(0.005)
    assert stuck_at is not None
    clock.advance(threshold_s - (clock() - stuck_at) + 0.001)  # the oldest is just past it
    after = []
    for _ in range(30):
        node = _pick_release(sel, clock)
        after.append(node.id)
    assert "b" not in after
    assert b.unusable_reason(clock()) == "hung"
    snap = {n["id"]: n for n in sel.snapshot()}
    assert snap["b"]["hung"] is True and snap["b"]["reason"] == "hung"
    assert snap["b"]["oldest_unanswered_s"] > threshold_s
    assert sel.node_stats()["b"]["hung"] is True


def test_before_the_threshold_a_slow_node_still_gets_calls(clock):
    sel = _selector(clock, "round_robin")
    _warm(sel, clock)
    a, b, c = sel.nodes
    started = clock()
    while sel.pick(started=started) is not b:
        pass
    clock.advance(0.2)  # under the 0.25 s floor
    assert not sel.is_hung(b)
    assert "b" in {_pick_release(sel, clock).id for _ in range(6)}


def test_a_node_that_keeps_answering_is_not_hung_by_one_long_call(clock):
    sel = _selector(clock, "round_robin")
    _warm(sel, clock)
    a, b, c = sel.nodes
    b.in_flight += 1
    long_started = clock()
    b.start_waiting(long_started)  # one long call on b
    for _ in range(200):
        clock.advance(0.01)
        started = clock()
        b.in_flight += 1
        b.start_waiting(started)
        sel.release_success(b, 20.0, started=started)  # b answers others all along
        sel.pick(started=clock())  # every pick checks
        for n in (a, c, b):
            while n.in_flight > (1 if n is b else 0):
                n.in_flight -= 1
                n.stop_waiting(n._awaiting_starts[-1])
    assert clock() - long_started > 1.0
    assert not sel.is_hung(b)


def test_the_calls_stuck_on_a_hung_node_are_cut_once_and_its_answer_clears_it(clock):
    sel = _selector(clock, "round_robin")
    _warm(sel, clock)
    a, b, c = sel.nodes
    b.transport.stuck = 2
    starts = []
    for _ in range(6):  # two of them land on b and stay
        started = clock()
        node = sel.pick(started=started)
        if node is b:
            starts.append(started)
        else:
            sel.release_success(node, 20.0, started=started)
    assert len(starts) == 2
    clock.advance(0.3)
    for _ in range(5):
        _pick_release(sel, clock)
    assert b.transport.cuts == 1  # once, not at every pick
    assert sel.snapshot()[1]["hung_calls_rescued"] == 2
    # the cut calls fail (timeouts) and give their slots back: b gets one trial at a time
    for started in starts:
        sel.release_failure(b, "timeout", 300.0, started=started)
    assert b.unusable_reason(clock()) is None and sel.is_hung(b)
    trial_at = clock()
    while sel.pick(started=trial_at) is not b:
        pass
    assert b.unusable_reason(clock()) == "hung"  # its trial waits: nothing more for b
    clock.advance(0.3)
    _pick_release(sel, clock)
    assert b.transport.cuts == 2  # the trial hung too: cut as well
    sel.release_failure(b, "timeout", 300.0, started=trial_at)
    trial_at = clock()
    while sel.pick(started=trial_at) is not b:
        pass
    sel.release_success(b, 20.0, started=trial_at)  # it answers: no longer hung
    assert not sel.is_hung(b) and b.unusable_reason(clock()) is None


def test_rescue_can_be_turned_off(clock):
    sel = _selector(clock, "round_robin", hang=HangPolicy(rescue=False, watch_interval_s=None, min_waiting=1))
    _warm(sel, clock)
    b = sel.nodes[1]
    started = clock()
    while sel.pick(started=started) is not b:
        pass
    clock.advance(1.0)
    _pick_release(sel, clock)
    assert sel.is_hung(b) and b.transport.cuts == 0


def test_an_unmeasured_node_uses_its_cold_guess(clock):
    sel = _selector(clock, "round_robin")
    b = sel.nodes[1]
    assert b.hang_threshold_s(sel.hang) == pytest.approx(4.0)  # 4 x the 1 s cold guess


@pytest.mark.parametrize("kw, field", [({"factor": 0.5}, "hang_factor"), ({"floor_s": 0}, "hang_floor_s"),
                                       ({"factor": float("nan")}, "hang_factor")])
def test_bad_hang_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        HangPolicy(**kw)


def test_the_watcher_rescues_a_lone_stuck_call_without_any_other_pick(clock):
    from tests.conftest import wait_until

    sel = _selector(clock, "round_robin", hang=HangPolicy(watch_interval_s=0.005, min_waiting=1))
    try:
        _warm(sel, clock)
        b = sel.nodes[1]
        b.transport.stuck = 1
        started = clock()
        while sel.pick(started=started) is not b:  # the pick starts the watcher
            pass
        clock.advance(0.3)  # nobody picks again
        assert wait_until(lambda: b.transport.cuts == 1, timeout_s=5.0)
        assert b.hung_rescued == 1
    finally:
        sel.close()


def test_the_watcher_ends_once_idle_and_a_pick_starts_it_again(clock):
    from tests.conftest import wait_until

    sel = _selector(clock, "round_robin", hang=HangPolicy(watch_interval_s=0.001, min_waiting=1))
    try:
        _pick_release(sel, clock)
        assert sel._watcher.running
        assert wait_until(lambda: not sel._watcher.running, timeout_s=5.0)  # 50 idle rounds
        _pick_release(sel, clock)
        assert sel._watcher.running
    finally:
        sel.close()


# -- the exchange registry and the fork registry ------------------------------------------------


class _Watch:
    """Stands in for a deadline.Watch: ``_expire()`` cuts it while it is attached."""

    def __init__(self, attached: bool = True) -> None:
        self.ended = False
        self.cut = False
        self.attached = attached

    def _expire(self) -> None:
        self.cut = self.attached


def test_exchanges_cut_the_live_ones_and_say_which_were_cut_as_hung():
    from holysheep_lb.hangs import Exchanges

    reg = Exchanges()
    live, done, unattached = _Watch(), _Watch(), _Watch(attached=False)
    done.ended = True
    for w in (live, done, unattached):
        reg.track(w)
    assert reg.cut_all() == 1  # the ended one is left alone; the unattached one is marked, not counted
    assert live.cut and not done.cut
    assert reg.was_cut_as_hung(live) is True
    assert reg.was_cut_as_hung(live) is False  # asked once
    assert reg.was_cut_as_hung(done) is False


def test_exchanges_memory_follows_the_live_ones():
    from holysheep_lb.hangs import Exchanges

    reg = Exchanges()
    for _ in range(10_000):
        w = _Watch()
        reg.track(w)
        w.ended = True
    assert len(reg) <= 128


def test_the_watcher_and_the_exchanges_join_the_fork_registry_and_reset_there(clock):
    from holysheep_lb import forksafe
    from holysheep_lb.hangs import Exchanges, HangWatcher

    watcher, reg = HangWatcher(0.01), Exchanges()
    live = {id(o) for o in forksafe.live_objects()}
    assert id(watcher) in live and id(reg) in live
    assert watcher.claim() and watcher.running
    reg.track(_Watch())
    old_lock = reg._lock
    watcher.reset_after_fork()  # what the registry calls in a child
    reg.reset_after_fork()
    assert not watcher.running and len(reg) == 0 and reg._lock is not old_lock
    assert watcher.claim()  # the child's next pick starts its own thread
    watcher.close()
    watcher.reset_after_fork.__wrapped__(watcher)  # a closed watcher stays closed in a child
    assert watcher.closed and not watcher.claim()


def test_a_node_forgets_its_waiting_and_hung_state_after_a_fork(clock):
    sel = _selector(clock, "round_robin")
    _warm(sel, clock)
    node = sel.nodes[0]
    started = clock()
    node.in_flight += 1
    node.start_waiting(started)
    clock.advance(30.0)
    assert sel.is_hung(node)
    node.reset_after_fork.__wrapped__(node)  # as the fork registry does in a child
    assert node.in_flight == 0 and node.awaiting == 0
    assert node.hung_since is None and node.oldest_unanswered_s(clock()) is None
    assert not sel.is_hung(node)


def test_a_lone_long_call_on_a_quiet_node_is_left_to_its_own_limits_by_default(clock):
    # a reasoning model thinking for a minute among fast calls looks like a hang: one
    # request alone never marks its node hung (nor is it cut); two stranded ones do
    sel = _selector(clock, "round_robin", hang=HangPolicy(watch_interval_s=None))
    for _ in range(40):
        node = sel.pick(started=clock())
        sel.release_success(node, 50.0, started=clock())
    lone_at = clock()
    lone = sel.pick(started=lone_at)
    clock.advance(30.0)
    assert lone.check_hung(clock(), sel.hang) is False
    assert lone.unusable_reason(clock()) is None
    second = sel.pick(exclude=[n.id for n in sel.nodes if n is not lone], started=clock())
    assert second is lone
    clock.advance(5.0)
    assert lone.check_hung(clock(), sel.hang) is True
