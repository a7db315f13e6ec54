"""Hedger mechanics with scripted attempts: who wins, who frees which node, caps and budgets."""

import threading
import time

import pytest

from holysheep_lb import ConfigError, InternalServerError
from holysheep_lb.hedging import Hedger
from holysheep_lb.retry import RetryBudget

NODES = [{"id": "a", "base_url": "https://a.example/v1"}, {"id": "b", "base_url": "https://b.example/v1"}]
TIMEOUT = (1.0, 5.0)
WAIT_S = 3.0  # upper bound for every wait below; none is reached when the code is right


@pytest.fixture
def selector(make_client):
    return make_client(NODES, strategy="round_robin").selector


def _in_flight(selector):
    return {n.id: n.in_flight for n in selector.nodes}


def _wait_for(predicate):
    deadline = time.monotonic() + WAIT_S
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        pause.wait(0.002)


class Script:
    """Attempts that behave as the client's: release the node on failure, keep it on success."""

    def __init__(self, selector, plan):
        self.selector = selector
        self.plan = plan  # node id -> ("ok" | "fail", threading.Event to wait for or None)
        self.started = []

    def __call__(self, node, timeout):
        self.started.append(node.id)
        outcome, gate = self.plan[node.id]
        if gate is not None:
            assert gate.wait(WAIT_S)
        if outcome == "fail":
            self.selector.release_failure(node, "status_5xx", 1.0, started=None)
            raise InternalServerError(f"{node.id} failed", status_code=500, node_id=node.id)
        return f"answer from {node.id}", 1.0


def _hedger(selector, **kw):
    kw.setdefault("delay_s", 0.01)
    kw.setdefault("max_ratio", 1.0)
    hedger = Hedger(selector=selector, **kw)
    hedger.deposit()
    return hedger


def _release(selector):
    """The caller's release for dropped copies (these tests do not track pick times)."""
    def release(node, latency_ms, result=None):
        if latency_ms is None:
            selector.release_cancelled(node, started=None)
        else:
            selector.release_success(node, latency_ms, started=None)
    return release


def _pick_other(selector, tried):
    def pick():
        node = selector.pick(exclude=tried, fresh_only=True)
        tried.append(node.id)
        return node
    return pick


def test_slow_primary_is_hedged_and_the_hedge_wins(selector):
    gate = threading.Event()
    script = Script(selector, {"a": ("ok", gate), "b": ("ok", None)})
    hedger = _hedger(selector)
    primary = selector.pick()
    node, result, _ = hedger.run(primary, TIMEOUT, attempt=script, release=_release(selector), pick_other=_pick_other(selector, ["a"]),
                                 deadline=time.monotonic() + 10)
    assert (node.id, result) == ("b", "answer from b")
    assert hedger.stats()["sent"] == 1 and hedger.stats()["won"] == 1
    selector.release_success(node, 1.0, started=None)  # the caller frees the winner
    assert _in_flight(selector) == {"a": 1, "b": 0}, "the loser is still running"
    gate.set()
    _wait_for(lambda: _in_flight(selector)["a"] == 0)  # ... and frees its node when it ends
    assert selector.node_stats()["a"]["successes"] == 1


def test_fast_primary_sends_no_hedge(selector):
    script = Script(selector, {"a": ("ok", None), "b": ("ok", None)})
    hedger = _hedger(selector, delay_s=1.0)
    node, result, _ = hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script, release=_release(selector),
                                 pick_other=_pick_other(selector, ["a"]), deadline=time.monotonic() + 10)
    assert node.id == "a" and script.started == ["a"]
    assert hedger.stats()["sent"] == 0


def test_a_primary_failing_before_the_delay_is_raised_without_hedging(selector):
    script = Script(selector, {"a": ("fail", None), "b": ("ok", None)})
    hedger = _hedger(selector, delay_s=1.0)
    with pytest.raises(InternalServerError, match="a failed"):
        hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script, release=_release(selector), pick_other=_pick_other(selector, ["a"]),
                   deadline=time.monotonic() + 10)
    assert script.started == ["a"] and _in_flight(selector) == {"a": 0, "b": 0}


def test_when_both_copies_fail_the_last_error_is_raised_and_both_nodes_are_free(selector):
    gate_a, gate_b = threading.Event(), threading.Event()
    script = Script(selector, {"a": ("fail", gate_a), "b": ("fail", gate_b)})
    hedger = _hedger(selector)
    errors = []

    def call():
        try:
            hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script, release=_release(selector), pick_other=_pick_other(selector, ["a"]),
                       deadline=time.monotonic() + 10)
        except InternalServerError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    _wait_for(lambda: script.started == ["a", "b"])
    gate_a.set()
    _wait_for(lambda: _in_flight(selector)["a"] == 0)
    gate_b.set()
    caller.join(WAIT_S)
    assert [str(e.message) for e in errors] == ["b failed"]
    assert _in_flight(selector) == {"a": 0, "b": 0}
    assert hedger.stats()["won"] == 0


def _run_in_thread(hedger, selector, script, dropped):
    """hedger.run on a thread of its own: the caller's view, as (node id or error message)."""
    out = []

    def call():
        try:
            node, _, _ = hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script,
                                    release=_release(selector), pick_other=_pick_other(selector, ["a"]),
                                    deadline=time.monotonic() + 10, drop_failure=lambda e: dropped.append(e.message))
            selector.release_success(node, 1.0, started=None)
            out.append(node.id)
        except InternalServerError as exc:
            out.append(exc.message)

    caller = threading.Thread(target=call)
    caller.start()
    return caller, out


def test_a_failed_copy_whose_error_is_not_raised_is_handed_to_drop_failure_once(selector):
    # both fail: the last error is raised, the first one dropped
    gate_a, gate_b = threading.Event(), threading.Event()
    dropped = []
    script = Script(selector, {"a": ("fail", gate_a), "b": ("fail", gate_b)})
    caller, out = _run_in_thread(_hedger(selector), selector, script, dropped)
    _wait_for(lambda: script.started == ["a", "b"])
    gate_a.set()
    _wait_for(lambda: _in_flight(selector)["a"] == 0)
    gate_b.set()
    caller.join(WAIT_S)
    assert (out, dropped) == (["b failed"], ["a failed"])


def test_a_copy_that_failed_before_the_other_won_is_dropped_not_raised(selector):
    gate_a, gate_b = threading.Event(), threading.Event()
    dropped = []
    script = Script(selector, {"a": ("fail", gate_a), "b": ("ok", gate_b)})
    caller, out = _run_in_thread(_hedger(selector), selector, script, dropped)
    _wait_for(lambda: script.started == ["a", "b"])
    gate_a.set()
    _wait_for(lambda: _in_flight(selector)["a"] == 0)
    assert dropped == []  # not yet: the race is not decided
    gate_b.set()
    caller.join(WAIT_S)
    assert (out, dropped) == (["b"], ["a failed"])


def test_a_copy_that_fails_after_the_race_was_won_is_dropped_from_its_own_thread(selector):
    gate_a, gate_b = threading.Event(), threading.Event()
    dropped = []
    script = Script(selector, {"a": ("ok", gate_a), "b": ("fail", gate_b)})
    caller, out = _run_in_thread(_hedger(selector), selector, script, dropped)
    _wait_for(lambda: script.started == ["a", "b"])
    gate_a.set()
    caller.join(WAIT_S)
    assert (out, dropped) == (["a"], [])
    gate_b.set()
    _wait_for(lambda: dropped == ["b failed"])
    assert _in_flight(selector) == {"a": 0, "b": 0}


def test_an_error_that_is_raised_is_never_dropped(selector):
    dropped = []
    script = Script(selector, {"a": ("fail", None), "b": ("ok", None)})
    with pytest.raises(InternalServerError, match="a failed"):
        _hedger(selector, delay_s=1.0).run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script,
                                           release=_release(selector), pick_other=_pick_other(selector, ["a"]),
                                           deadline=time.monotonic() + 10, drop_failure=dropped.append)
    assert dropped == []


def test_the_hedge_cap_counts_calls(selector):
    hedger = Hedger(selector=selector, delay_s=0.001, max_ratio=0.25)
    caller = threading.current_thread()
    hedged = []
    for _ in range(8):
        hedger.deposit()
        sent_before = hedger.stats()["sent"]

        def slow_primary(node, timeout):
            if threading.current_thread() is not caller and node.id == "a":
                _wait_for(lambda: hedger.stats()["sent"] > sent_before)  # slow until hedged
            return "x", 1.0

        node, _, _ = hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=slow_primary, release=_release(selector),
                                pick_other=_pick_other(selector, ["a"]), deadline=time.monotonic() + 10)
        hedged.append(hedger.stats()["sent"] > sent_before)
        selector.release_success(node, 1.0, started=None)
        _wait_for(lambda: _in_flight(selector) == {"a": 0, "b": 0})
    # one hedge per 4 calls; the other calls ran unhedged on the caller's thread
    assert hedged == [False, False, False, True] * 2


def test_no_hedge_without_retry_budget(selector, clock):
    budget = RetryBudget(0.0, min_per_s=0.0, clock=clock)  # nothing to spend
    hedger = _hedger(selector, retry_budget=budget)
    started = []

    def slow_primary(node, timeout):
        started.append(threading.current_thread())
        return "x", 1.0

    node, _, _ = hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=slow_primary, release=_release(selector),
                            pick_other=_pick_other(selector, ["a"]), deadline=time.monotonic() + 10)
    assert node.id == "a" and started == [threading.current_thread()], "no room for a hedge: inline"
    assert hedger.stats()["sent"] == 0
    budget.deposit()  # a floor of 0 and a ratio of 0 still leave nothing
    assert not budget.can_withdraw()


def test_without_a_free_thread_the_attempt_runs_inline(selector):
    hedger = _hedger(selector, max_threads=1)
    assert hedger._take_thread()  # the only thread slot is busy
    ran_on = []

    def attempt(node, timeout):
        ran_on.append(threading.current_thread().name)
        return "x", 1.0

    node, _, _ = hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=attempt, release=_release(selector),
                            pick_other=_pick_other(selector, ["a"]), deadline=time.monotonic() + 10)
    assert ran_on == [threading.current_thread().name] and node.id == "a"


def test_p95_delay_waits_for_enough_samples(selector):
    hedger = Hedger(selector=selector, delay_s="p95")
    node = selector.nodes[0]
    for _ in range(19):
        selector.release_success(selector.pick(exclude=["b"]), 100.0, started=None)
    assert hedger.delay_for(node) is None
    selector.release_success(selector.pick(exclude=["b"]), 100.0, started=None)
    assert hedger.delay_for(node) == pytest.approx(0.1, rel=0.05)
    assert Hedger(selector=selector, delay_s=0.25).delay_for(node) == 0.25


@pytest.mark.parametrize("options, field", [
    ({"hedge_delay_s": 0}, "hedge_delay_s"),
    ({"hedge_delay_s": "p99"}, "hedge_delay_s"),
    ({"hedge_max_ratio": 0}, "hedge_max_ratio"),
    ({"hedge_max_ratio": 1.5}, "hedge_max_ratio"),
    ({"hedge_max_threads": 0}, "hedge_max_threads"),
    ({"retry_budget_ratio": -0.1}, "retry_budget_ratio"),
    ({"retry_budget_ttl_s": 0}, "retry_budget_ttl_s"),
])
def test_hedging_and_budget_settings_are_validated(make_client, options, field):
    with pytest.raises(ConfigError) as info:
        make_client(NODES, **options)
    assert info.value.field == field


def test_a_pick_that_raises_gives_back_the_thread_cap_and_budget(selector, clock):
    budget = RetryBudget(1.0, min_per_s=0.0, clock=clock)
    hedger = _hedger(selector, max_threads=2, retry_budget=budget)
    gate = threading.Event()
    script = Script(selector, {"a": ("ok", gate), "b": ("ok", None)})

    def broken_pick():
        raise RuntimeError("storage down")

    for _ in range(3):  # more rounds than thread slots: a leak would show by round 3
        hedger.deposit()
        budget.deposit()
        threads_before = hedger.stats()["threads_busy"]
        gate.clear()
        threading.Timer(0.05, gate.set).start()
        with pytest.raises(RuntimeError, match="storage down"):
            hedger.run(selector.pick(exclude=["b"]), TIMEOUT, attempt=script, release=_release(selector),
                       pick_other=broken_pick, deadline=time.monotonic() + 10)
        _wait_for(lambda: _in_flight(selector) == {"a": 0, "b": 0})
        _wait_for(lambda: hedger.stats()["threads_busy"] == threads_before)
    assert hedger.stats()["sent"] == 0
    assert budget.can_withdraw(), "the budget withdrawn for the hedge was refunded"
