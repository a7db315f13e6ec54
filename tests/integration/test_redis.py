"""Shared state on a real redis-server (started here on 127.0.0.1): many processes share
one rate limit, one breaker and one budget; Redis dies and comes back mid-run.

Without ``redis-server`` these tests skip (saying how to install it), except when the
environment variable CI is set: then they fail (fixtures in conftest.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from decimal import Decimal

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")

from holysheep_lb import Budget, BudgetExceededError, CircuitOpenError, Client, HolySheepError, RateLimitExceeded  # noqa: E402
from holysheep_lb.breakers import BreakerBoard  # noqa: E402
from holysheep_lb.config import BreakerSettings  # noqa: E402
from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.errors import NoHealthyNodeError  # noqa: E402
from holysheep_lb.pricing import (  # noqa: E402
    OTHER_MODELS, InMemorySpendStore, Limit, PriceTable, Reservation, SpendLedger, SpendRow)
from tests.conftest import FakeClock, wait_until  # noqa: E402
from tests.integration.test_cost_control import MSGS, PER_CALL  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

JOIN_S = 60


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


def _join_all(processes) -> None:
    for p in processes:
        p.join(JOIN_S)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(10)
    assert not alive, "a worker process did not finish in time"
    assert [p.exitcode for p in processes] == [0] * len(processes)


def _in_threads(run, threads: int) -> None:
    """``run(k)`` for k in range(threads), each on its own thread; returns when all end."""
    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(JOIN_S)


# -- the Lua scripts, on a fake clock -----------------------------------------------------


def test_bucket_script_on_a_fake_clock(redis_server, prefix):
    clock = FakeClock(1000.0)
    state = RedisSharedState(redis_server.url, prefix=prefix, redis_time=clock, sleep=clock.sleep)
    bucket = state.rate_limiter_factory("requests", 2.0, 4)

    assert [bucket.try_acquire() for _ in range(5)] == [True, True, True, True, False]  # starts full
    clock.advance(0.25)
    assert not bucket.try_acquire()  # half a token
    clock.advance(0.25)
    assert bucket.try_acquire()

    with pytest.raises(RateLimitExceeded) as refused:  # due in 1 s, later than the timeout
        bucket.acquire(2, timeout=0.5)
    assert refused.value.retry_after_s == 1.0
    assert bucket.available() == 0.0  # a refusal takes nothing

    bucket.acquire(2, timeout=5)  # takes its place in line, then sleeps until its tokens are due
    assert clock.sleeps == [1.0]
    assert bucket.available() == 0.0
    bucket.adjust(3)  # three more, into debt: nobody may overtake the line
    assert bucket.available() == -3.0
    clock.advance(1.5)
    assert not bucket.try_acquire()
    clock.advance(0.5)
    assert bucket.try_acquire()

    bucket.adjust(-10)  # given back, up to the capacity
    assert bucket.available() == 4.0
    bucket.adjust(6)
    assert bucket.available() == -2.0
    # the key expires once the bucket holds a whole minute again (126 / 2 s) plus a second
    assert 63000 < state.redis.pttl(f"{prefix}ratelimit:requests") <= 64000
    with pytest.raises(RateLimitExceeded) as never:
        bucket.acquire(125)
    assert never.value.retry_after_s is None  # more than a minute's worth (4 + 60 * 2)
    snap = bucket.snapshot()  # this process's waits and refusals, for stats() and metrics
    assert (snap["waits"], snap["waited_s"], snap["rejections"]) == (1, 1.0, 2)


def test_bucket_time_comes_from_the_redis_server(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix)
    assert state.rate_limiter_factory("requests", 1.0, 10).try_acquire()
    seconds, micros = state.redis.time()
    stamp = float(state.redis.hget(f"{prefix}ratelimit:requests", "stamp"))
    assert 0 <= seconds + micros / 1e6 - stamp < 5  # the server's TIME, to the microsecond


def test_spend_scripts_match_the_in_memory_store_exactly(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix, retain_days=40)
    shared, local = state.spend_store, InMemorySpendStore()
    day = "2026-11-26"
    limits = [Limit(None, "day", Decimal("0.001")), Limit("gpt-4.1", "month", Decimal("0.0006"))]
    calls = [Reservation("gpt-4.1", day, 100, 10, Decimal("0.00028")) for _ in range(3)]
    for store in (shared, local):
        assert store.try_reserve(calls[0], limits) is None
        assert store.try_reserve(calls[1], limits) is None
    refused = [store.try_reserve(calls[2], limits) for store in (shared, local)]
    assert refused[0] == refused[1]
    assert (refused[0].limit, refused[0].spent_usd, refused[0].reserved_usd) == (limits[1], 0, Decimal("0.00056"))
    assert shared.reserved_usd() == local.reserved_usd() == Decimal("0.00056")
    for store in (shared, local):
        store.settle(calls[0], input_tokens=90, output_tokens=12, cost_usd=Decimal("0.000276"))
        store.cancel(calls[1])
        store.record_cache_hit("gpt-4.1", day)
        store.record_cache_hit("deepseek-v3.2", "2026-11-27")
    expected = [SpendRow(day, "gpt-4.1", requests=1, cached_requests=1, input_tokens=90, output_tokens=12,
                         cost_usd=Decimal("0.000276")),
                SpendRow("2026-11-27", "deepseek-v3.2", cached_requests=1)]
    assert sorted(shared.rows(), key=repr) == sorted(local.rows(), key=repr) == sorted(expected, key=repr)
    assert shared.reserved_usd() == local.reserved_usd() == 0
    # the month's spend counts against the monthly cap
    assert shared.try_reserve(Reservation("gpt-4.1", day, 1, 1, Decimal("0.000325")), limits) is not None
    assert shared.try_reserve(Reservation("gpt-4.1", day, 1, 1, Decimal("0.000324")), limits) is None

    keys = sorted(k.decode() for k in state.redis.keys(f"{prefix}*"))
    assert keys == [f"{prefix}spend:day:2026-11-26", f"{prefix}spend:day:2026-11-27", f"{prefix}spend:days",
                    f"{prefix}spend:month:2026-11"]
    assert all(0 < state.redis.ttl(k) <= 40 * 86400 for k in keys)  # every key expires


def test_prompt_cache_details_match_the_in_memory_store_and_reach_cost_report(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix)
    shared, local = state.spend_store, InMemorySpendStore(max_models_per_day=2)
    shared._local.max_models_per_day = 2  # a small day: the third model on goes to the others' row
    day = "2026-11-26"
    for store in (shared, local):
        for model in ("gpt-4.1", "claude-sonnet-4.5", "extra-1", "extra-2"):
            r = Reservation(model, day, 2000, 10, Decimal("0.01"))
            assert store.try_reserve(r, []) is None
            store.settle(r, input_tokens=2000, output_tokens=10, cost_usd=Decimal("0.002"))
            # writing to the cache can cost more than it saves: a saving may be negative
            saved = Decimal("-0.000075") if model.startswith("claude") else Decimal("0.00225")
            store.record_usage_details(model, day, cached_input_tokens=1500, cache_write_tokens=100,
                                       cache_saved_usd=saved, unreadable_usage=int(model == "extra-2"))
    rows = sorted(shared.rows(), key=repr)
    assert rows == sorted(local.rows(), key=repr)
    by_model = {row.model: row for row in rows}
    assert sorted(by_model) == sorted(["gpt-4.1", "claude-sonnet-4.5", OTHER_MODELS])
    assert by_model["claude-sonnet-4.5"].cache_saved_usd == Decimal("-0.000075")
    assert (by_model[OTHER_MODELS].cached_input_tokens, by_model[OTHER_MODELS].unreadable_usage) == (3000, 1)
    fields = [f.decode() for f in state.redis.hkeys(f"{prefix}spend:day:{day}")]
    assert not [f for f in fields if "extra" in f]  # the others' details stay in the others' row
    totals = SpendLedger(PriceTable(), store=shared).report()["totals"]
    assert (totals["cached_input_tokens"], totals["cache_write_tokens"], totals["unreadable_usage"]) == (6000, 400, 1)
    assert totals["cache_saved_usd"] == pytest.approx(3 * 0.00225 - 0.000075)


# -- many processes ---------------------------------------------------------------------


def _share_one_limit(url, prefix, rate_per_s, burst, threads, ready, start_q, results) -> None:
    limiter = RedisSharedState(url, prefix=prefix).rate_limiter_factory("requests", rate_per_s, burst)
    ready.put(os.getpid())
    start, end = start_q.get(timeout=JOIN_S)  # wall-clock times, the same for every process
    threading.Event().wait(max(0.0, start - time.time()))
    admitted = [0] * threads

    def run(k: int) -> None:
        while True:
            left = end - time.time()
            if left <= 0:
                return
            try:
                limiter.acquire(1, timeout=left)
            except RateLimitExceeded:  # the line is longer than the window left
                return
            admitted[k] += 1

    _in_threads(run, threads)
    results.put(sum(admitted))


def test_four_processes_of_eight_threads_share_one_rate_limit(redis_server, prefix):
    rate_per_s, burst, window_s, processes = 20.0, 5, 2.0, 4  # 45 turns for 32 threads: each gets one
    ctx = mp.get_context("spawn")
    ready, start_q, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_share_one_limit,
                         args=(redis_server.url, prefix, rate_per_s, burst, 8, ready, start_q, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=JOIN_S)
        start = time.time() + 0.2
        for _ in procs:
            start_q.put((start, start + window_s))
        admitted = [results.get(timeout=JOIN_S) for _ in procs]
    finally:
        _join_all(procs)
    r = int(rate_per_s * window_s)  # R: the limit's rate over the window
    assert r <= sum(admitted) <= r + burst, admitted
    assert all(n > 0 for n in admitted), admitted  # every process had its share


def _trip_the_breaker(url, prefix, nodes, results) -> None:
    state = RedisSharedState(url, prefix=prefix)
    client = Client(nodes=nodes, health_check_interval_s=None, max_retries=0, retry_budget_ratio=None,
                    breaker={"fail_max": 3, "reset_timeout_s": 60, "trial_interval_s": 60}, **state.client_options())
    errors = []
    for _ in range(5):
        try:
            client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
        except HolySheepError as exc:
            errors.append(type(exc).__name__)
    client.close()
    results.put(errors)


def test_a_breaker_tripped_in_one_process_is_open_in_another(redis_server, prefix, gateway_factory):
    gw = gateway_factory([{"id": "a", "error_rate": 1.0}])
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_trip_the_breaker, args=(redis_server.url, prefix, gw.client_nodes(), results))
    proc.start()
    try:
        errors = results.get(timeout=JOIN_S)
    finally:
        _join_all([proc])
    assert errors == ["AllAttemptsFailedError"] * 3 + ["CircuitOpenError"] * 2
    assert gw.request_count("a") == 3

    state = RedisSharedState(redis_server.url, prefix=prefix)
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None,
                breaker={"fail_max": 3, "reset_timeout_s": 60, "trial_interval_s": 60},
                **state.client_options()) as client:
        with pytest.raises(CircuitOpenError) as opened:
            client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
        assert client.breaker_allows("gpt-4.1") is False
    assert opened.value.breaker == "model:gpt-4.1"
    assert 55 < opened.value.retry_after_s <= 60
    assert gw.request_count("a") == 3  # this process sent nothing


def _spend_until_refused(url, prefix, nodes, cap_usd, threads, results) -> None:
    state = RedisSharedState(url, prefix=prefix)
    client = Client(nodes=nodes, health_check_interval_s=None, budget=Budget(daily_usd=cap_usd),
                    **state.client_options())
    ok, refused = [0] * threads, [0] * threads
    start = threading.Barrier(threads)

    def run(k: int) -> None:
        start.wait(timeout=JOIN_S)
        for _ in range(100):
            try:
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
            except BudgetExceededError:
                refused[k] += 1
                return
            ok[k] += 1

    _in_threads(run, threads)
    client.close()
    results.put((sum(ok), sum(refused)))


def test_a_budget_stops_spend_across_processes(redis_server, prefix, gateway_factory):
    gw = gateway_factory([{"id": "a"}, {"id": "b"}])
    cap_usd, processes, threads = 0.01, 3, 4
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_spend_until_refused,
                         args=(redis_server.url, prefix, gw.client_nodes(), cap_usd, threads, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=JOIN_S) for _ in procs]
    finally:
        _join_all(procs)
    fits = int(Decimal(str(cap_usd)) / PER_CALL)
    assert fits == 40
    assert sum(ok for ok, _ in outcomes) == fits  # exactly what the cap allows, over all processes
    assert sum(refused for _, refused in outcomes) == processes * threads  # every thread was stopped
    assert sum(gw.counts().values()) == fits
    store = RedisSharedState(redis_server.url, prefix=prefix).spend_store
    assert sum(r.cost_usd for r in store.rows()) == PER_CALL * fits <= Decimal(str(cap_usd))
    assert store.reserved_usd() == 0


def test_a_forked_child_uses_the_state_it_inherited(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix)
    limiter = state.rate_limiter_factory("requests", 0.001, 10)
    assert limiter.try_acquire(3)  # the parent's pool now holds an open connection
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=1, reset_timeout_s=60),
                         storage_factory=state.breaker_storage)
    board.admit("model", "m").record(None)
    ctx = mp.get_context("fork")
    results = ctx.Queue()

    def child() -> None:
        try:
            took = limiter.try_acquire(3)
            board.admit("model", "m").record(NoHealthyNodeError("down"))  # trips it (fail_max=1)
            results.put(("ok", took, state.status()["failures"]))
        except BaseException as exc:  # report anything to the parent
            results.put(("error", repr(exc)))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        outcome = results.get(timeout=JOIN_S)
    finally:
        _join_all([proc])
    assert outcome == ("ok", True, 0)
    # the parent's own connections still work, and it sees what the child did
    with pytest.raises(CircuitOpenError):
        board.admit("model", "m")
    assert limiter.available() == pytest.approx(4, abs=0.01)
    assert state.status()["failures"] == 0


# -- Redis goes away --------------------------------------------------------------------


def test_redis_killed_mid_run_calls_go_on_with_one_warning(redis_binary, gateway_factory, caplog):
    caplog.set_level(logging.INFO, logger="holysheep_lb")
    gw = gateway_factory([{"id": "a"}, {"id": "b"}])
    errors, done = [], [0] * 4
    stop = threading.Event()
    with RedisServer(redis_binary) as server:
        state = RedisSharedState(server.url, prefix="kill:", warn_interval_s=60, retry_interval_s=0.05)
        client = Client(nodes=gw.client_nodes(), health_check_interval_s=None, requests_per_minute=600_000,
                        tokens_per_minute=10_000_000, budget=Budget(daily_usd=100), **state.client_options())

        def run(k: int) -> None:
            while not stop.is_set():
                try:
                    client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
                except Exception as exc:  # any exception at all fails the test
                    errors.append(exc)
                    return
                done[k] += 1

        workers = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        try:
            for t in workers:
                t.start()
            assert wait_until(lambda: sum(done) >= 40, timeout_s=20)
            server.kill()
            killed_at = sum(done)
            assert wait_until(lambda: sum(done) >= killed_at + 100, timeout_s=20)  # calls go on
            assert state.status()["reachable"] is False
            server.start()  # same port, empty
            assert wait_until(lambda: state.status()["reachable"] and state.spend_store.pending() == 0,
                              timeout_s=20)
            back_at = sum(done)
            assert wait_until(lambda: sum(done) >= back_at + 40, timeout_s=20)
        finally:
            stop.set()
            for t in workers:
                t.join(JOIN_S)
            client.close()
        total = sum(done)
        rows = state.spend_store.rows()
        assert state.spend_store.reserved_usd() == 0  # nothing stranded in Redis
        # the shared state is in use again (a breaker's key is written by each call it records)
        assert state.redis.exists("kill:ratelimit:requests", "kill:breaker:model:gpt-4.1:pybreaker:fail_counter") == 2
    assert errors == []
    warnings = [r for r in caplog.records if r.name.startswith("holysheep_lb.contrib") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Redis is unreachable" in warnings[0].getMessage()
    assert not any(r.name.startswith("pybreaker") for r in caplog.records)
    # what was spent while Redis was away was written to it when it came back
    assert total - killed_at - 4 <= sum(r.requests for r in rows) <= total


def test_the_shared_limits_are_back_when_redis_returns(redis_binary, gateway_factory):
    gw = gateway_factory([{"id": "a"}])
    with RedisServer(redis_binary) as server:
        # The state's clock decides when Redis is tried again after a failure; a fake
        # one makes "back" a step of the test rather than a race with the real clock.
        state_clock = FakeClock()
        state = RedisSharedState(server.url, prefix="back:", retry_interval_s=1.0, clock=state_clock)
        # the Client's limit of 6 a minute with a burst of 30 s: a burst of 3, refilled 3 a minute
        other_process = RedisSharedState(server.url, prefix="back:").rate_limiter_factory("requests", 0.05, 3)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, requests_per_minute=6, deadline_s=1.0,
                    rate_limit_burst_s=30, **state.client_options()) as client:

            def calls(n: int):
                out = []
                for _ in range(n):
                    try:
                        client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
                        out.append("ok")
                    except RateLimitExceeded:
                        out.append("limited")
                return out

            assert calls(2) == ["ok", "ok"]
            # shared (the bucket refills 0.05 token/s: 0.3 allows 6 s of a loaded machine)
            assert other_process.available() == pytest.approx(1, abs=0.3)
            server.kill()
            assert calls(3) == ["ok"] * 3  # this process's own bucket: a fresh burst of 3
            server.start()  # empty: a fresh shared bucket (its burst of 3), not the local one (spent)
            state_clock.advance(1.0)  # the retry interval has passed: the next call tries Redis
            assert calls(4) == ["ok"] * 3 + ["limited"]
            assert state.status()["reachable"]
            assert other_process.available() == pytest.approx(0, abs=0.3)


def test_spend_settled_through_redis_leaves_the_local_per_model_cap_exact_for_the_next_outage(redis_binary):
    clock = FakeClock()
    budget = Budget(per_model={"gpt-4.1": {"daily_usd": 0.01}})  # 40 estimates of PER_CALL, and a bit
    with RedisServer(redis_binary) as server:
        state = RedisSharedState(server.url, prefix="mirror:", retry_interval_s=1.0, clock=clock)
        store = state.spend_store
        ledger = SpendLedger(PriceTable(), store=store, budget=budget, wall_clock=lambda: 1.78e9)

        def local_reserved():
            return [pair[1] for pair in store._local._totals.values()]

        server.kill()  # 1) an outage: one call held locally makes the local per-model totals
        ledger.cancel(ledger.admit("gpt-4.1", MSGS, {"max_tokens": 5}))
        server.start()
        clock.advance(1.0)  # 2) Redis is back: 10 calls reserved and settled through it
        for _ in range(10):
            reservation = ledger.admit("gpt-4.1", MSGS, {"max_tokens": 5})
            ledger.settle(reservation, {"prompt_tokens": 104, "completion_tokens": 5})  # cost == estimate
        assert state.status()["reachable"] and store.pending() == 0
        assert local_reserved() and all(r == 0 for r in local_reserved())  # never below zero
        server.kill()  # 3) the next outage: the $0.01 cap is held locally, knowing the 10 calls' spend
        admitted = 0
        with pytest.raises(BudgetExceededError) as refused:
            for _ in range(100):
                ledger.admit("gpt-4.1", MSGS, {"max_tokens": 5})
                admitted += 1
    assert admitted == 30  # (0.01 - 10 x PER_CALL) // PER_CALL, not 40
    assert refused.value.scope == "gpt-4.1"
    assert Decimal(str(refused.value.spent_usd)) == 10 * PER_CALL
    assert Decimal(str(refused.value.reserved_usd)) == 30 * PER_CALL
    assert all(r >= 0 for r in local_reserved())


# -- keys made from caller-chosen names stay bounded -------------------------------------


def test_breaker_keys_expire_and_reading_a_breaker_writes_nothing(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix, breaker_ttl_s=3600)
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=2, reset_timeout_s=60),
                         storage_factory=state.breaker_storage)
    for i in range(300):
        board.allows("model", f"read-only-{i}")  # reading creates no key
    assert state.redis.keys(f"{prefix}*") == []
    for i in range(300):
        board.admit("model", f"m{i}").record(None if i % 2 else NoHealthyNodeError("down"))
    for _ in range(2):
        board.admit("model", "tripped").record(NoHealthyNodeError("down"))
    with pytest.raises(CircuitOpenError):
        board.admit("model", "tripped")
    keys = [k.decode() for k in state.redis.keys(f"{prefix}*")]
    assert len(keys) == 300 + 4  # a failure counter each; "tripped" also has its state, open time, successes
    assert {k.rsplit(":", 1)[1] for k in keys} == {"fail_counter", "state", "opened_at", "success_counter"}
    ttls = [state.redis.ttl(k) for k in keys]
    assert all(3500 < t <= 3600 for t in ttls), sorted(ttls)[:3]  # every key expires, refreshed on write


def test_a_breaker_name_of_any_length_makes_a_short_key(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix)
    used_before = state.redis.info("memory")["used_memory"]
    for i in range(20):
        storage = state.breaker_storage(f"model:{i}" + "x" * 200_000)
        storage.increment_counter()
        assert storage.counter == 1
    keys = state.redis.keys(f"{prefix}*")
    assert len(keys) == 20 and max(len(k) for k in keys) < len(prefix) + 120
    assert state.redis.info("memory")["used_memory"] - used_before < 1_000_000  # 35 MiB before


def test_the_client_refuses_overlong_or_control_character_model_names_before_redis(redis_server, prefix,
                                                                                 gateway_factory):
    from holysheep_lb import InvalidRequestError

    gw = gateway_factory([{"id": "a"}])
    state = RedisSharedState(redis_server.url, prefix=prefix)
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None, requests_per_minute=600,
                budget={"daily_usd": 10}, **state.client_options()) as client:
        for bad in ("m" * 257, "x" * 200_000, "gpt-4.1\n", "gpt\x00", "gpt\x7f"):
            with pytest.raises(InvalidRequestError) as refused:
                client.chat_completion(MSGS, model=bad, max_tokens=5)
            assert refused.value.field == "model" and len(str(refused.value)) < 300
        assert gw.request_count("a") == 0
        assert [k for k in state.redis.keys(f"{prefix}*") if b"breaker" in k] == []
        assert client.chat_completion(MSGS, model="m" * 256, max_tokens=5)["choices"]  # the longest allowed


def test_the_spend_hashes_name_at_most_max_models_per_day_models(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix)
    shared, local = state.spend_store, InMemorySpendStore()
    day = "2026-11-26"
    capped = Limit("capped", "day", Decimal("0.001"))

    def capped_call(store) -> None:
        r = Reservation("capped", day, 1, 1, Decimal("0.0004"))
        assert store.try_reserve(r, [capped]) is None
        store.settle(r, input_tokens=1, output_tokens=1, cost_usd=Decimal("0.0004"))

    for store in (shared, local):
        capped_call(store)
        for i in range(300):  # 300 caller-chosen names: the first get their own row, the rest one together
            r = Reservation(f"junk-{i}", day, 1, 1, Decimal("0.000001"))
            assert store.try_reserve(r, [Limit(None, "day", Decimal("1"))]) is None
            store.settle(r, input_tokens=1, output_tokens=1, cost_usd=Decimal("0.000001"))
        capped_call(store)  # a model with its own cap: its cap still holds exactly
        refused = store.try_reserve(Reservation("capped", day, 1, 1, Decimal("0.0004")), [capped])
        assert refused is not None and refused.spent_usd == Decimal("0.0008")
    assert sorted(shared.rows(), key=repr) == sorted(local.rows(), key=repr)
    assert len(shared.rows()) == 256 + 1
    day_fields = state.redis.hkeys(f"{prefix}spend:day:{day}")
    month_fields = state.redis.hkeys(f"{prefix}spend:month:2026-11")
    assert len(day_fields) < 260 * 5
    assert sorted(f.decode() for f in month_fields) == ["client:reserved", "client:spent", "model:capped:reserved",
                                                        "model:capped:spent"]


# -- the per-minute rule, shared (ratelimit branch) ----------------------------------------


def _fullest_window(events, window_s):
    events = sorted(events)
    best = total = 0.0
    j = 0
    for i in range(len(events)):
        total += events[i][1]
        while events[i][0] - events[j][0] > window_s:
            total -= events[j][1]
            j += 1
        best = max(best, total)
    return best


def test_a_shared_rpm_holds_over_every_60_s_window_with_32_threads_on_a_fake_clock(redis_server, prefix):
    clock = FakeClock(5000.0)
    # a generous op timeout: 32 threads on a shared machine must not push the test onto local buckets
    state = RedisSharedState(redis_server.url, prefix=prefix, redis_time=clock, sleep=clock.sleep,
                             op_timeout_s=30.0, socket_timeout_s=30.0)
    per_minute, threads, rounds = 120, 32, 4 * 150  # 150 s in 0.25 s steps
    # two "processes" (two limiters on one key), as the Client makes them: burst 2, refill 118/min
    limiters = [state.rate_limiter_factory("requests", 118 / 60.0, 2.0) for _ in range(2)]
    start, done = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
    grants, grants_lock = [], threading.Lock()

    def worker(i):
        for _ in range(rounds):
            start.wait(JOIN_S)
            for _ in range(2):
                if limiters[i % 2].try_acquire():
                    with grants_lock:
                        grants.append((clock(), 1))
            done.wait(JOIN_S)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for _ in range(rounds):
        start.wait(JOIN_S)
        done.wait(JOIN_S)
        clock.advance(0.25)
    for t in pool:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in pool)
    assert state.status()["reachable"], "every decision was Redis's"
    assert _fullest_window(grants, 60.0) <= per_minute
    assert len(grants) >= 2 + 118 / 60.0 * 149.75 - 2  # the pace: burst + refill, nothing lost
    first_second = [g for g in grants if g[0] < 5001.0]
    assert len(first_second) <= 2 + 118 / 60.0  # a fresh limit lets its burst through, not a minute


def test_a_shared_token_limit_prepays_a_call_larger_than_its_burst(redis_server, prefix):
    clock = FakeClock(1000.0)
    state = RedisSharedState(redis_server.url, prefix=prefix, redis_time=clock, sleep=clock.sleep)
    bucket = state.rate_limiter_factory("tokens", 5900 / 60.0, 100.0)  # 6000 a minute, burst 100
    assert bucket.max_take == pytest.approx(6000.0)
    bucket.acquire(1000, timeout=0)  # idle for a minute (a new key): goes at once, in debt
    assert bucket.available() == pytest.approx(100 - 1000)
    bucket.acquire(50, timeout=60)  # granted now, due once the debt is repaid
    assert clock.sleeps == [pytest.approx(950 / (5900 / 60.0))]
    assert bucket.available() == pytest.approx(0.0, abs=1e-6)
    clock.advance(60)
    assert bucket.available() == pytest.approx(5900.0)  # refilled past the burst while idle
    bucket.adjust(-500)  # a give-back never adds to an idle bucket
    assert bucket.available() == pytest.approx(5900.0)
    assert bucket.try_acquire(2000)
    assert bucket.available() == pytest.approx(100 - 2000)  # cut to the burst, then taken
    clock.advance(10)
    bucket.adjust(-5000)  # given back up to the burst only
    assert bucket.available() == pytest.approx(100.0)
