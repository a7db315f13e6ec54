"""The fork registry: objects join it themselves, a real child after os.fork() resets each live
one once, in phase order, and a collected object is not reset.

Each fork test runs its checks in the child, which exits with a status code saying what it
saw; the parent waits for it with a bounded poll (and kills it past the bound).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import traceback
import weakref
from typing import Callable, List

import pytest

from holysheep_lb import client as client_module
from holysheep_lb import forksafe
from holysheep_lb.client import Client
from holysheep_lb.deadline import _WATCHDOG
from holysheep_lb.ratelimit import TokenBucket
from holysheep_lb.simulator import SimulatedGateway

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

MSGS = [{"role": "user", "content": "ping"}]
RESETS: List[str] = []  # what Probe resets appended, in order (the child's copy is the child's)


class Probe:
    def __init__(self, name: str, phase: int = forksafe.PHASE_STATE, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        forksafe.register(self, phase=phase)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        RESETS.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} cannot reset")


def _in_child(body: Callable[[], int], timeout_s: float = 30.0) -> int:
    """Run ``body`` in a forked child; its return value is the child's exit status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            signal.alarm(20)  # a deadlocked child dies instead of hanging the suite
            code = body()
        except BaseException:
            traceback.print_exc()
            code = 98
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child did not finish")
        threading.Event().wait(0.02)
    assert os.WIFEXITED(status), f"the child was killed by signal {os.WTERMSIG(status)}"
    return os.WEXITSTATUS(status)


@pytest.fixture
def resets():
    RESETS.clear()
    yield RESETS
    RESETS.clear()


@pytest.fixture
def gateway():
    gw = SimulatedGateway([{"id": "a", "region": "us-east"}, {"id": "b", "region": "eu-west"}], seed=7).start()
    yield gw
    gw.stop()


# -- in one process ------------------------------------------------------------------------


def test_an_object_without_a_reset_or_with_an_unknown_phase_is_refused():
    with pytest.raises(TypeError, match="object has no reset_after_fork"):
        forksafe.register(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phase must be one of"):
        forksafe.register(Probe("p"), phase=7)


def test_a_second_reset_in_the_same_process_does_nothing(resets):
    probe = Probe("once")
    probe.reset_after_fork()
    probe.reset_after_fork()
    assert resets == ["once"]


def test_an_object_that_did_not_join_resets_on_every_call(resets):
    class Loner:
        name = "loner"
        fail = False
        reset_after_fork = Probe.reset_after_fork

    loner = Loner()
    loner.reset_after_fork()
    loner.reset_after_fork()
    assert resets == ["loner", "loner"]


def test_the_registry_holds_weak_references_and_forgets_collected_objects(monkeypatch):
    monkeypatch.setattr(forksafe, "_entries", {})  # a table of this test's own
    monkeypatch.setattr(forksafe, "_prune_at", 1000)
    short_lived = [Probe(f"short-lived {i}") for i in range(100)]
    refs = [weakref.ref(p) for p in short_lived]
    del short_lived
    assert all(ref() is None for ref in refs)  # the registry kept none of them alive
    assert len(forksafe._entries) == 100 and forksafe.live_objects() == []
    monkeypatch.setattr(forksafe, "_prune_at", 0)  # the next registration finds the table past its bound
    kept = Probe("kept")
    assert forksafe.live_objects() == [kept]
    assert len(forksafe._entries) == 1  # the collected objects' entries are gone
    assert forksafe._prune_at == 64  # next prune when the table doubles past 64 entries (or 2x the live ones)


def test_the_library_objects_join_the_registry_when_built(gateway):
    client = Client(nodes=gateway.client_nodes(), api_key="sk-test", health_check_interval_s=60,
                    requests_per_minute=600, hedge_delay_s=5.0, retry_budget_ratio=0.2)
    try:
        live = {id(o) for o in forksafe.live_objects()}
        p = client._parts
        parts = [client.selector, client.selector._watcher, *client.selector.nodes,
                 *(n.transport for n in client.selector.nodes), *(n.transport.exchanges for n in client.selector.nodes),
                 p.chain, p.breakers, p.chain.limits, *filter(None, p.chain.limits._client), p.retry_budget,
                 p.hedger, p.health, p.ledger, p.ledger.prices, p.ledger.store, p.stream_stats, p.tally, _WATCHDOG]
        missing = [type(p).__name__ for p in parts if id(p) not in live]
        assert missing == []
    finally:
        client.close()


# -- in a real child -------------------------------------------------------------------------


@needs_fork
def test_a_child_resets_live_objects_by_phase_then_age_and_skips_collected_ones(resets):
    thread_probe = Probe("threads", forksafe.PHASE_THREADS)
    conn_probe = Probe("connections", forksafe.PHASE_CONNECTIONS)
    first, second = Probe("state 1"), Probe("state 2")
    gone = Probe("collected")
    del gone
    gc.collect()

    def child() -> int:
        mine = [name for name in RESETS if name != "short-lived"]
        if "collected" in mine:
            return 2
        wanted = ["state 1", "state 2", "connections", "threads"]
        return 0 if [n for n in mine if n in wanted] == wanted else 3

    assert _in_child(child) == 0
    assert resets == []  # the parent reset nothing
    assert {p.name for p in (thread_probe, conn_probe, first, second)} == {  # alive through the fork
        "threads", "connections", "state 1", "state 2"}


@needs_fork
def test_a_failing_reset_is_logged_and_the_others_still_run(resets):
    probes = [Probe("broken", fail=True), Probe("after it")]
    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    logging.getLogger("holysheep_lb.forksafe").addHandler(handler)
    try:
        def child() -> int:
            if "after it" not in RESETS:
                return 2
            logged = [r for r in records if "Probe" in r.getMessage() and r.exc_info is not None]
            return 0 if logged else 3

        assert _in_child(child) == 0
    finally:
        logging.getLogger("holysheep_lb.forksafe").removeHandler(handler)
    assert [p.name for p in probes] == ["broken", "after it"]  # alive through the fork


@needs_fork
def test_a_bucket_whose_lock_a_parent_thread_held_at_the_fork_works_in_the_child():
    bucket = TokenBucket(10.0, 10.0, name="requests")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with bucket._tokens_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(5)
    try:
        assert _in_child(lambda: 0 if bucket.try_acquire(1) else 2) == 0
    finally:
        release.set()
        holder.join(5)


def _hold_locks(client: Client, held: threading.Event, release: threading.Event) -> None:
    """Hold, from a parent thread, the locks a call takes (none of them the Client's own)."""
    p = client._parts
    with client.selector._state_lock, p.chain.limits._client[0]._tokens_lock, p.ledger.store._ledger_lock, \
            p.breakers._breakers_lock, p.chain._counts_lock, p.stream_stats._stats_lock, p.tally._tally_lock, \
            _WATCHDOG._heap_cond, client.selector.nodes[0].transport.exchanges._lock:
        held.set()
        release.wait(10)


@needs_fork
def test_a_client_built_in_the_parent_answers_in_the_child_without_its_own_fork_hook(gateway):
    client = Client(nodes=gateway.client_nodes(), api_key="sk-test", health_check_interval_s=None,
                    requests_per_minute=600)
    assert client.chat_completion(MSGS, model="m")  # pooled connections and used locks in the parent
    assert not hasattr(client_module, "_LIVE_CLIENTS")  # the Client has no fork hook of its own
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_locks, args=(client, held, release), daemon=True)
    holder.start()
    assert held.wait(5)

    def child() -> int:
        resp = client.chat_completion(MSGS, model="m")
        if not resp.text.startswith("[m]"):
            return 2
        return 0 if client.stats()["in_flight"] == 0 else 3

    try:
        assert _in_child(child) == 0
    finally:
        release.set()
        holder.join(5)
        client.close()


@needs_fork
def test_the_clients_own_hook_after_the_registry_resets_nothing_twice(gateway):
    client = Client(nodes=gateway.client_nodes(), api_key="sk-test", health_check_interval_s=None,
                    requests_per_minute=600, retry_budget_ratio=0.2)
    assert client.chat_completion(MSGS, model="m")

    def locks() -> List[int]:
        p = client._parts
        return [id(client.selector._state_lock), id(p.chain.limits._client[0]._tokens_lock),
                id(p.ledger.store._ledger_lock), id(p.tally._tally_lock), id(p.retry_budget._budget_lock),
                id(p.breakers._breakers_lock), id(p.stream_stats._stats_lock),
                id(client.selector.nodes[0].transport.session)]

    before = locks()

    def child() -> int:
        after_fork = locks()  # both the registry and the Client's hook have run by now
        if any(a == b for a, b in zip(after_fork, before)):
            return 2  # something was not reset at all
        client._reset_after_fork()  # the hand-wired reset, once more
        if locks() != after_fork:
            return 3  # a part was reset twice
        return 0 if client.chat_completion(MSGS, model="m").text.startswith("[m]") else 4

    try:
        assert _in_child(child) == 0
    finally:
        client.close()


def test_the_redis_parts_join_the_registry_themselves():
    redis = pytest.importorskip("redis", reason="the redis extra is not installed")
    from holysheep_lb.contrib.redis import RedisSharedState

    state = RedisSharedState(redis.Redis(host="127.0.0.1", port=1))  # nothing connects until used
    limiter = state.rate_limiter_factory("requests", 1.0, 60.0)
    live = {id(o) for o in forksafe.live_objects()}
    assert {id(state._link), id(state.spend_store), id(limiter), id(limiter._local)} <= live
    state.close()
