"""An interrupt (Ctrl-C, a worker's soft time limit) at any point of a call leaks nothing.

Each test runs one kind of call again and again, raising a BaseException that is not an
Exception from the Nth call the caller's thread makes into the client's clock, sleep,
wall clock, random source or a node's transport (before the call, or after it returned:
an interrupt landing just after an answer arrived). N is swept over every such point,
until the call runs to its end untouched. After each interrupt: no node in-flight slot,
no spend reservation, no breaker trial and no hedge thread is left, and the next call
works, within a bounded time (a lock left held would deadlock it).
"""

from __future__ import annotations

import json
import threading
import traceback
from decimal import Decimal
from typing import Any, Callable, List, Optional

import pytest
import responses

from holysheep_lb import InternalServerError, hedging
from holysheep_lb.selection import Strategy
from holysheep_lb.transport import HTTPResult

from .conftest import API_KEY, FakeClock, chat_body, wait_until

A = "https://a.example/v1"
B = "https://b.example/v1"
C = "https://c.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}, {"id": "c", "base_url": C}]
MSGS = [{"role": "user", "content": "hello"}]
MAX_POINTS = 400  # a call makes far fewer calls than this into what the tripwire watches
NEXT_CALL_S = 10.0  # the next call must end within this (it takes milliseconds)


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt or a worker's soft time limit."""


class Tripwire:
    """Raises Interrupt at the ``at``-th call made from the armed thread; counts them."""

    def __init__(self) -> None:
        self.at = 0
        self.count = 0
        self.fired: Optional[str] = None
        self._thread: Optional[threading.Thread] = None

    def arm(self, at: int) -> None:
        self.at, self.count, self.fired = at, 0, None
        self._thread = threading.current_thread()

    def disarm(self) -> None:
        self._thread = None

    def tick(self, where: str) -> None:
        if self._thread is not threading.current_thread() or self.fired is not None:
            return
        self.count += 1
        if self.count == self.at:
            self.fired = where
            raise Interrupt(f"interrupted at point {self.at} ({where})")


def _watched(trip: Tripwire, where: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        trip.tick(f"{where} (before)")
        result = fn(*args, **kwargs)
        trip.tick(f"{where} (after)")
        return result
    return call


class InOrder(Strategy):
    """Always the first usable node in configuration order: every call has the same shape."""

    def choose(self, candidates, ctx):
        return candidates[0]


def _watched_chunks(trip: Tripwire, where: str, iter_bytes: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        for chunk in iter_bytes(*args, **kwargs):
            trip.tick(f"{where} (chunk)")
            yield chunk
    return call


def _client(make_client, trip: Tripwire, **options):
    clock = FakeClock()
    client = make_client(NODES, clock=_watched(trip, "clock", clock), sleep=_watched(trip, "sleep", clock.sleep),
                         wall_clock=_watched(trip, "wall_clock", lambda: 1_790_000_000.0 + clock.now),
                         rand=_watched(trip, "rand", lambda: 0.5), strategy=InOrder(), **options)
    for node in client.selector.nodes:
        transport = node.transport
        for name in ("send", "open", "raise_for_error_status", "set_read_timeout"):
            setattr(transport, name, _watched(trip, f"{node.id}.{name}", getattr(transport, name)))
        transport.iter_bytes = _watched_chunks(trip, f"{node.id}.iter_bytes", transport.iter_bytes)
    return client


def _hedge_threads(client) -> int:
    hedges = client.stats()["hedges"]
    return 0 if hedges is None else hedges["threads_busy"]


def _assert_nothing_held(client) -> None:
    assert wait_until(lambda: not _hedge_threads(client), 5.0), "a hedge thread is still running"
    stats = client.stats()  # settles streams dropped by the interrupt
    nodes = client.selector.nodes
    assert stats["in_flight"] == 0, {n.id: n.in_flight for n in nodes}
    assert [(n.awaiting, n.trial_in_flight) for n in nodes] == [(0, False)] * len(nodes)
    assert client.ledger.store.reserved_usd() == Decimal(0)
    assert [b["trials_in_flight"] for b in client.breakers()] == [0] * len(client.breakers())
    cache = client._cache
    assert cache is None or not cache._pending, "an identical call would wait for a call that is gone"


def _next_call_works(call: Callable[[], Any]) -> None:
    """Run ``call`` on a daemon thread: a deadlock fails the test instead of hanging it."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(NEXT_CALL_S)
    assert not worker.is_alive(), "the call after an interrupt is stuck (a lock left held?)"
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])


def _sweep(client, trip: Tripwire, call: Callable[[], Any], after: Callable[[], Any],
           on_interrupt: Callable[[], Any] = lambda: None) -> List[str]:
    """Interrupt ``call`` at every point in turn; returns where the interrupts landed."""
    landed = []
    for at in range(1, MAX_POINTS):
        trip.arm(at)
        try:
            call()
        except Interrupt:
            on_interrupt()
        finally:
            trip.disarm()
        if trip.fired is None:
            assert at > 5, "the call made almost no watched calls: the sweep proves little"
            _assert_nothing_held(client)
            return landed
        landed.append(trip.fired)
        try:
            _assert_nothing_held(client)
            _next_call_works(after)
            _assert_nothing_held(client)
        except AssertionError as exc:
            raise AssertionError(f"after an interrupt at point {at} ({trip.fired}): {exc}") from None
    raise AssertionError(f"the call was still interrupted after {MAX_POINTS} points")


def _install_send(client, trip: Tripwire, answer: Callable[[str, Any], Any]) -> None:
    """Each node's ``transport.send`` returns ``answer(node_id, payload)`` (or raises), watched."""
    for node in client.selector.nodes:
        def send(method, path, *, body=None, headers=None, timeout_s, deadline_s=None, secrets=(), _id=node.id):
            return HTTPResult(200, answer(_id, json.loads(body)), None)
        node.transport.send = _watched(trip, f"{node.id}.send", send)


def _first_node_fails(node_id: str, payload: Any) -> Any:
    if node_id == "a":
        raise InternalServerError("a is down", status_code=500, node_id="a")
    return chat_body(payload["model"])


LIMITS = dict(node_breakers={"fail_max": 1_000_000}, requests_per_minute=100_000,
              tokens_per_minute=10_000_000, eject_after_failures=1000, retry_budget_min_per_s=1000.0)


def test_interrupts_anywhere_in_a_call_that_fails_over_leak_nothing(make_client):
    trip = Tripwire()
    client = _client(make_client, trip, **LIMITS)
    _install_send(client, trip, _first_node_fails)
    call = lambda: client.chat_completion(MSGS, model="gpt-4.1", max_tokens=10)  # noqa: E731
    landed = _sweep(client, trip, call, call)
    assert {"a.send (before)", "b.send (after)", "sleep (before)", "rand (after)"} <= set(landed)


def test_interrupts_anywhere_in_a_cached_call_leak_nothing(make_client):
    trip = Tripwire()
    client = _client(make_client, trip, cache={"maxsize": 4}, **LIMITS)
    _install_send(client, trip, _first_node_fails)
    prompts = iter(range(MAX_POINTS * 2))

    def call() -> Any:  # a new prompt each time: the first of its kind, it makes the call
        return client.chat_completion([{"role": "user", "content": f"hello {next(prompts)}"}], model="gpt-4.1",
                                      max_tokens=10, temperature=0)

    landed = _sweep(client, trip, call, call)
    assert "b.send (after)" in landed and client.stats()["cache"]["stores"] >= 1


def test_interrupts_anywhere_in_a_model_fallback_leak_nothing(make_client):
    trip = Tripwire()
    client = _client(make_client, trip, fallbacks={"gpt-4.1": ["gemini-2.5-flash"]}, max_retries=1,
                     breaker={"fail_max": 1000}, **LIMITS)

    def gpt_down(node_id: str, payload: Any) -> Any:
        if payload["model"] == "gpt-4.1":
            raise InternalServerError("overloaded", status_code=503, node_id=node_id)
        return chat_body(payload["model"])

    _install_send(client, trip, gpt_down)
    call = lambda: client.chat_completion(MSGS, model="gpt-4.1", max_tokens=10)  # noqa: E731
    _sweep(client, trip, call, call)


def test_interrupts_anywhere_in_a_hedged_call_leak_nothing_and_never_deadlock(make_client, monkeypatch):
    trip = Tripwire()
    # where a real Ctrl-C most often lands: while the caller waits for the copies
    monkeypatch.setattr(hedging._Race, "wait", _watched(trip, "race.wait", hedging._Race.wait))
    client = _client(make_client, trip, hedge_delay_s=0.001, hedge_max_ratio=1.0, retry_budget_ratio=None,
                     **LIMITS)
    hedge_sent = threading.Event()

    def slow_primary(node_id: str, payload: Any) -> Any:
        if node_id == "a":  # answers once the hedge has been sent (bounded)
            hedge_sent.wait(2.0)
        else:
            hedge_sent.set()
        return chat_body(payload["model"])

    _install_send(client, trip, slow_primary)

    def call() -> Any:
        hedge_sent.clear()
        return client.chat_completion(MSGS, model="gpt-4.1", max_tokens=10)

    landed = _sweep(client, trip, call, call, on_interrupt=hedge_sent.set)  # the abandoned primary ends now
    assert client.stats()["hedges"]["sent"] >= 1 and {"race.wait (before)", "race.wait (after)"} <= set(landed)


GOOD_STREAM = b"".join(
    f"data: {json.dumps(chunk)}\n\n".encode() for chunk in (
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "lo"},
                                                         "finish_reason": "stop"}]},
        {"object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
) + b"data: [DONE]\n\n"


def test_interrupts_anywhere_in_a_stream_leak_nothing(make_client):
    trip = Tripwire()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(A + "/chat/completions", status=500, json={"error": {"message": "down"}})
        for url in (B, C):
            rsps.post(url + "/chat/completions", body=GOOD_STREAM, content_type="text/event-stream")
        client = _client(make_client, trip, **LIMITS)
        call = lambda: client.chat_completion(MSGS, model="gpt-4.1", stream=True, max_tokens=10).read_text()  # noqa: E731
        landed = _sweep(client, trip, call, call)
    assert {"a.open (before)", "b.iter_bytes (chunk)", "b.set_read_timeout (after)"} <= set(landed)


def test_the_tripwire_sees_only_the_armed_thread():
    trip = Tripwire()
    trip.arm(1)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(trip.tick("elsewhere")))
    worker.start()
    worker.join(5.0)
    with pytest.raises(Interrupt):
        trip.tick("here")
    assert seen == [None] and trip.fired == "here" and API_KEY


def test_a_call_never_enters_a_python_level_condition_on_the_callers_thread(make_client, monkeypatch):
    """``threading.Condition.__enter__`` is Python code: a KeyboardInterrupt landing in it
    right after it took its lock leaves the lock held, and the next one to use it hangs
    (hedged calls deadlocked so: the caller in ``_abandon``, a hedge thread in ``settle``).
    Events and semaphores are built on Conditions, and so is ``Thread.start()``. Hedged,
    rate-limited and cached calls use none of them on the caller's thread."""
    caller = threading.get_ident()
    entered: List[str] = []

    class Recording(threading.Condition):
        def __enter__(self):
            if threading.get_ident() == caller:
                frame = traceback.extract_stack(limit=3)[0]
                entered.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}")
            return super().__enter__()

    hedge_sent = threading.Event()  # the test's own, made before the patch
    monkeypatch.setattr(threading, "Condition", Recording)
    trip = Tripwire()
    client = _client(make_client, trip, hedge_delay_s=0.001, hedge_max_ratio=1.0, retry_budget_ratio=None,
                     cache=True, requests_per_minute=100_000, tokens_per_minute=10_000_000)

    def slow_primary(node_id: str, payload: Any) -> Any:
        if node_id == "a":
            hedge_sent.wait(2.0)
        else:
            hedge_sent.set()
        return chat_body(payload["model"])

    _install_send(client, trip, slow_primary)
    for prompt in ("one", "two", "two"):  # hedged calls, then a cache hit
        hedge_sent.clear()
        client.chat_completion([{"role": "user", "content": prompt}], model="gpt-4.1", temperature=0)
    assert client.stats()["hedges"]["sent"] >= 1 and client.stats()["cache"]["hits"] == 1
    assert entered == []
