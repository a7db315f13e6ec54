"""Circuit breakers: pybreaker's state machine driven by recorded outcomes, on a fake clock."""

import threading
from datetime import datetime, timezone

import pybreaker
import pytest
import responses

from holysheep_lb import (
    AllAttemptsFailedError,
    APIConnectionError,
    APIStatusError,
    Attempt,
    BadRequestError,
    BreakerSettings,
    CircuitOpenError,
    ConfigError,
    InternalServerError,
    RateLimitError,
)
from holysheep_lb.breakers import BreakerBoard, verdict
from holysheep_lb.retry import RETRY_BUDGET_EXHAUSTED

A = "https://a.example/v1"
B = "https://b.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}]
MSGS = [{"role": "user", "content": "hello"}]
OK = {"id": "x", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}

SYSTEM_FAILURE = AllAttemptsFailedError(
    "all 1 attempts failed", [Attempt("a", 5.0, 503, "InternalServerError: down", "status_5xx")])


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


def _state(board, name="model:m"):
    return next(b for b in board.snapshot() if b["name"] == name)


def test_breaker_cycle_closed_open_half_open_closed_then_open_again(clock):
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=3, reset_timeout_s=10, success_threshold=2),
                         clock=clock)
    for expected in (1, 2):
        board.admit("model", "m").record(SYSTEM_FAILURE)
        assert (_state(board)["state"], _state(board)["failures"]) == ("closed", expected)
    board.admit("model", "m").record(SYSTEM_FAILURE)
    assert (_state(board)["state"], _state(board)["failures"]) == ("open", 3)
    assert _state(board)["retry_after_s"] == 10

    with pytest.raises(CircuitOpenError) as info:
        board.admit("model", "m")
    assert info.value.retry_after_s == 10 and info.value.breaker == "model:m"
    clock.advance(9.5)
    with pytest.raises(CircuitOpenError) as info:
        board.admit("model", "m")
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert not board.allows("model", "m")

    clock.advance(0.5)
    assert board.allows("model", "m")
    first, second = board.admit("model", "m"), board.admit("model", "m")  # two trial calls
    assert _state(board)["state"] == "half-open" and _state(board)["trials_in_flight"] == 2
    with pytest.raises(CircuitOpenError) as info:  # no more trials than success_threshold
        board.admit("model", "m")
    assert info.value.retry_after_s == 0
    first.record(None)
    assert (_state(board)["state"], _state(board)["successes"]) == ("half-open", 1)
    second.record(None)
    assert (_state(board)["state"], _state(board)["failures"], _state(board)["trials_in_flight"]) == ("closed", 0, 0)
    assert board.stats() == {"opened": 1, "half_opened": 1, "closed": 1, "open_now": 0, "half_open_now": 0,
                             "storage_errors": 0}

    for _ in range(3):
        board.admit("model", "m").record(SYSTEM_FAILURE)
    clock.advance(10)
    trial = board.admit("model", "m")
    clock.advance(2)
    trial.record(SYSTEM_FAILURE)  # a failed trial opens it again, for a trial interval (min(10, 10))
    assert _state(board)["state"] == "open" and _state(board)["retry_after_s"] == 10
    assert board.stats() == {"opened": 3, "half_opened": 2, "closed": 1, "open_now": 1, "half_open_now": 0,
                             "storage_errors": 0}


def test_a_permit_counts_once_and_a_release_counts_nothing(clock):
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=2), clock=clock)
    permit = board.admit("model", "m")
    permit.record(SYSTEM_FAILURE)
    permit.record(SYSTEM_FAILURE)
    assert _state(board)["failures"] == 1
    board.admit("model", "m").release()
    assert _state(board)["failures"] == 1


def test_success_resets_the_failure_streak(clock):
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=2), clock=clock)
    for _ in range(5):
        board.admit("model", "m").record(SYSTEM_FAILURE)
        board.admit("model", "m").record(None)
    assert _state(board)["state"] == "closed"


def test_a_late_outcome_from_before_the_trip_does_not_decide_half_open(clock):
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=1, reset_timeout_s=5), clock=clock)
    slow = board.admit("model", "m")  # admitted while closed, still running
    board.admit("model", "m").record(SYSTEM_FAILURE)
    clock.advance(5)
    trial = board.admit("model", "m")
    slow.record(None)
    assert _state(board)["state"] == "half-open"
    trial.record(None)
    assert _state(board)["state"] == "closed"


@pytest.mark.parametrize("error, expected", [
    (None, "success"),
    (SYSTEM_FAILURE, "failure"),
    (AllAttemptsFailedError("x", [Attempt("a", 1.0, 429, "RateLimitError: slow down", "status_429")]), "none"),
    (AllAttemptsFailedError("deadline exceeded", []), "none"),
    # the client's retry budget, not the model, cut the call short
    (AllAttemptsFailedError(RETRY_BUDGET_EXHAUSTED, [Attempt("a", 1.0, 502, "InternalServerError: x",
                                                           "status_5xx")]), "none"),
    (InternalServerError("boom", status_code=502), "failure"),
    (APIConnectionError("refused"), "failure"),
    (BadRequestError("bad", status_code=400), "success"),
    (RateLimitError("slow", status_code=429), "none"),
    (KeyError("bug"), "none"),
])
def test_verdict_counts_only_system_failures(error, expected):
    assert verdict(error) == expected


def test_breakers_share_state_through_their_storage(clock):
    storages = {}

    def factory(name):
        return storages.setdefault(name, pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED))

    settings = BreakerSettings(fail_max=1, reset_timeout_s=30, trial_interval_s=30)
    first = BreakerBoard(model_settings=settings, storage_factory=factory, clock=clock)
    second = BreakerBoard(model_settings=settings, storage_factory=factory, clock=clock)  # another process
    assert second.allows("model", "m")
    first.admit("model", "m").record(SYSTEM_FAILURE)
    assert list(storages) == ["model:m"]
    assert storages["model:m"].state == "open"
    assert storages["model:m"].opened_at == datetime.fromtimestamp(clock(), timezone.utc)
    with pytest.raises(CircuitOpenError):
        second.admit("model", "m")
    assert second.stats()["opened"] == 1  # the second board's listener saw the change too


def test_per_model_settings_and_off_switch(clock):
    board = BreakerBoard(model_settings=None, per_model={"fragile": BreakerSettings(fail_max=1)}, clock=clock)
    for _ in range(10):
        board.admit("model", "sturdy").record(SYSTEM_FAILURE)
    assert board.allows("model", "sturdy") and board.snapshot() == []
    board.admit("model", "fragile").record(SYSTEM_FAILURE)
    assert not board.allows("model", "fragile")
    assert [b["name"] for b in board.snapshot()] == ["model:fragile"]


def test_idle_breakers_are_forgotten_beyond_the_cap(clock, monkeypatch):
    monkeypatch.setattr("holysheep_lb.breakers._MAX_BREAKERS", 3)
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=5), clock=clock)
    board.admit("model", "failing").record(SYSTEM_FAILURE)
    for i in range(10):
        board.admit("model", f"m{i}").record(None)
    names = [b["name"] for b in board.snapshot()]
    assert len(names) == 3 and "model:failing" in names


def test_breaker_settings_are_validated():
    with pytest.raises(ConfigError) as info:
        BreakerSettings.from_value("model_breakers[x]", {"fail_max": 0})
    assert info.value.field == "model_breakers[x].fail_max"
    with pytest.raises(ConfigError):
        BreakerSettings.from_value("breaker", {"fail_maxx": 3})
    assert BreakerSettings.from_value("breaker", True) == BreakerSettings()
    assert BreakerSettings.from_value("breaker", False) is None


# -- through the Client ----------------------------------------------------------------------


def _client(make_client, clock, **kw):
    kw.setdefault("strategy", "round_robin")
    kw.setdefault("retry_budget_ratio", None)
    return make_client(NODES, clock=clock, sleep=clock.sleep, rand=lambda: 0.0, **kw)


def test_client_opens_the_model_breaker_and_fails_fast_until_reset(rsps, make_client, clock, debug_logs):
    rsps.post(A + "/chat/completions", status=500)
    rsps.post(B + "/chat/completions", status=500)
    client = _client(make_client, clock, breaker={"fail_max": 3, "reset_timeout_s": 20, "trial_interval_s": 20},
                     max_retries=1, eject_after_failures=100)
    for _ in range(3):
        with pytest.raises(AllAttemptsFailedError):
            client.chat_completion(MSGS, model="m")
    assert len(rsps.calls) == 6
    with pytest.raises(CircuitOpenError) as info:
        client.chat_completion(MSGS, model="m")
    assert info.value.retry_after_s == pytest.approx(20)
    assert len(rsps.calls) == 6, "an open breaker sends nothing"
    assert not client.breaker_allows("m") and client.breaker_allows("other-model")
    [snap] = client.breakers()
    assert (snap["name"], snap["state"], snap["failures"]) == ("model:m", "open", 3)
    assert "circuit breaker model:m opened" in debug_logs.text

    clock.advance(20)
    rsps.replace(responses.POST, A + "/chat/completions", json=OK)
    rsps.replace(responses.POST, B + "/chat/completions", json=OK)
    assert client.chat_completion(MSGS, model="m").text == "hi"
    assert client.breakers()[0]["state"] == "closed"
    stats = client.stats()
    assert stats["breakers"]["opened"] == 1 and stats["breakers"]["closed"] == 1
    # every user call counts once, the one refused by the open breaker included
    assert stats["failures_by_error"] == {"AllAttemptsFailedError": 3, "CircuitOpenError": 1}
    assert (stats["calls"], stats["successes"]) == (5, 1)
    assert stats["fallbacks"]["circuit_open_skips"] == 1


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_a_4xx_storm_does_not_trip_the_breaker(rsps, make_client, clock, status):
    for url in (A, B):
        rsps.post(url + "/chat/completions", status=status, json={"error": {"message": "no"}})
    client = _client(make_client, clock, breaker={"fail_max": 2}, max_retries=0)
    for _ in range(50):
        with pytest.raises(AllAttemptsFailedError if status == 429 else APIStatusError):
            client.chat_completion(MSGS, model="m")
    assert len(rsps.calls) == 50, "every call was sent: the breaker never opened"
    [snap] = client.breakers()
    assert (snap["state"], snap["failures"]) == ("closed", 0)
    assert client.stats()["breakers"]["opened"] == 0


def test_node_breakers_keep_traffic_off_a_node(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=503)
    rsps.post(B + "/chat/completions", json=OK)
    client = _client(make_client, clock, node_breakers={"fail_max": 2, "reset_timeout_s": 60},
                     eject_after_failures=100)
    for _ in range(6):
        assert client.chat_completion(MSGS, model="m").node_id == "b"
    hits_a = sum(1 for c in rsps.calls if c.request.url.startswith(A))
    assert hits_a == 2, "node a's breaker opened after 2 failures"
    names = {b["name"]: b["state"] for b in client.breakers()}
    assert names["node:a"] == "open" and names["node:b"] == "closed"


def test_node_breakers_all_open_raise_circuit_open(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=503)
    rsps.post(B + "/chat/completions", status=503)
    client = _client(make_client, clock, node_breakers={"fail_max": 1, "reset_timeout_s": 60, "trial_interval_s": 60},
                     eject_after_failures=100, breaker=None)
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="m")
    sent = len(rsps.calls)
    assert sent == 2
    with pytest.raises(CircuitOpenError) as info:
        client.chat_completion(MSGS, model="m")
    assert info.value.breaker.startswith("node:") and info.value.retry_after_s == pytest.approx(60)
    assert len(rsps.calls) == sent


class _BrokenStorage(pybreaker.CircuitMemoryStorage):
    """A shared store that goes away once ``broken`` is set: reads and writes raise."""

    def __init__(self):
        super().__init__(pybreaker.STATE_CLOSED)
        self.broken = False

    @property
    def state(self):
        if self.broken:
            raise ConnectionError("store unreachable")
        return pybreaker.CircuitMemoryStorage.state.fget(self)

    @state.setter
    def state(self, value):
        pybreaker.CircuitMemoryStorage.state.fset(self, value)

    def increment_counter(self):
        if self.broken:
            raise ConnectionError("store unreachable")
        super().increment_counter()


@pytest.mark.parametrize("broken_from_start", [False, True])
def test_a_failing_breaker_storage_fails_open_and_warns_once(rsps, make_client, clock, caplog,
                                                             broken_from_start):
    import logging
    caplog.set_level(logging.WARNING, logger="holysheep_lb")
    rsps.post(A + "/chat/completions", json=OK)
    rsps.post(B + "/chat/completions", json=OK)
    stores = []

    def factory(name):
        store = _BrokenStorage()
        store.broken = broken_from_start
        stores.append(store)
        return store

    client = _client(make_client, clock, breaker_storage=factory)
    assert client.chat_completion(MSGS, model="m").text == "hi"
    for store in stores:
        store.broken = True
    for _ in range(5):
        assert client.chat_completion(MSGS, model="m").text == "hi"  # nothing raw escapes
    stats = client.stats()
    assert stats["in_flight"] == 0 and stats["successes"] == 6
    assert stats["breakers"]["storage_errors"] >= 5
    if not broken_from_start:
        assert client.breakers()[0]["state"] == "unknown"
    warnings = [r for r in caplog.records if "storage failed" in r.getMessage()]
    assert len(warnings) == 1


def test_transition_logs_are_written_outside_the_breaker_lock(caplog):
    """A log handler that reads breaker state must not deadlock."""
    import logging
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=1))
    seen = []

    class Reader(logging.Handler):
        def emit(self, record):
            if "circuit breaker" in record.getMessage():
                seen.append(board.snapshot())  # takes every breaker's lock

    handler = Reader()
    logging.getLogger("holysheep_lb").addHandler(handler)
    try:
        permit = board.admit("model", "m")
        done = threading.Event()
        worker = threading.Thread(target=lambda: (permit.record(SYSTEM_FAILURE), done.set()), daemon=True)
        worker.start()
        assert done.wait(5), "recording a failure deadlocked in the log handler"
    finally:
        logging.getLogger("holysheep_lb").removeHandler(handler)
    assert seen and seen[0][0]["state"] == "open"
