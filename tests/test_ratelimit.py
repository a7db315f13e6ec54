"""Token buckets (fake clock and real threads) and the client's RPM/TPM limits."""

import threading
import time

import pytest
import responses

from holysheep_lb import AllAttemptsFailedError, ConfigError, RateLimitExceeded, TokenBucket
from holysheep_lb.ratelimit import estimate_tokens, usage_tokens

A = "https://a.example/v1"
MSGS = [{"role": "user", "content": "x" * 40}]  # 10 tokens of text + 4 per message
OK = {"id": "x", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
      "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}}


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


# -- the bucket on a fake clock -------------------------------------------------------------


def test_bucket_admits_exactly_capacity_plus_rate_times_elapsed(clock):
    bucket = TokenBucket(4, 10, clock=clock)
    admitted = attempts = 0
    for step in range(33):  # 0 .. 8 s in 0.25 s steps
        if step:
            clock.advance(0.25)
        for _ in range(3):
            attempts += 1
            admitted += bucket.try_acquire()
    assert attempts == 99
    assert admitted == 10 + 4 * 8


def test_acquire_with_zero_timeout_says_when_it_would_fit(clock):
    bucket = TokenBucket(2, 4, clock=clock)
    bucket.acquire(4, timeout=0)
    clock.advance(0.5)  # one token back
    with pytest.raises(RateLimitExceeded) as info:
        bucket.acquire(3, timeout=0)
    assert info.value.retry_after_s == pytest.approx(1.0)
    assert (info.value.limiter, info.value.requested) == ("bucket", 3)
    assert bucket.available() == pytest.approx(1.0)


def test_more_than_capacity_can_never_be_admitted(clock):
    bucket = TokenBucket(1, 5, clock=clock, name="tokens")
    with pytest.raises(RateLimitExceeded) as info:
        bucket.acquire(6, timeout=None)  # fails at once instead of blocking forever
    assert info.value.retry_after_s is None
    with pytest.raises(RateLimitExceeded):
        bucket.try_acquire(6)
    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            bucket.try_acquire(bad)
    with pytest.raises(ValueError):
        TokenBucket(0, 5)


def test_adjust_takes_into_debt_and_gives_back_up_to_capacity(clock):
    bucket = TokenBucket(5, 10, clock=clock)
    bucket.acquire(10, timeout=0)
    bucket.adjust(5)
    assert bucket.available() == -5
    clock.advance(1)
    assert bucket.available() == 0
    bucket.adjust(-3)
    assert bucket.available() == 3
    bucket.adjust(-100)
    assert bucket.available() == 10


# -- the bucket under real threads ---------------------------------------------------------


def test_fifty_threads_never_over_issue_and_never_wait_past_their_timeout():
    rate, capacity, timeout_s, run_s = 200.0, 10.0, 0.05, 0.6
    t0 = time.monotonic()
    bucket = TokenBucket(rate, capacity)
    grants, waits, timeouts = [], [], []
    record = threading.Lock()
    stop = threading.Event()
    start = threading.Barrier(50)

    def worker():
        start.wait()
        while not stop.is_set():
            began = time.monotonic()
            try:
                bucket.acquire(1, timeout=timeout_s)
                ok = True
            except RateLimitExceeded:
                ok = False
            ended = time.monotonic()
            with record:
                waits.append(ended - began)
                (grants if ok else timeouts).append(ended)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    stop.wait(run_s)
    stop.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    grants.sort()
    for i, at in enumerate(grants):  # the (i+1)-th grant happened by `at`
        assert i + 1 <= capacity + rate * (at - t0) + 1e-6, "a token was issued before it existed"
    assert len(grants) > capacity + rate * 0.3, "the bucket refilled and kept granting"
    assert timeouts, "50 threads at 200 tokens/s must contend"
    assert max(waits) < timeout_s + 0.1, f"someone waited {max(waits):.3f} s, past the {timeout_s} s timeout"


def test_bucket_counts_waits_and_rejections_but_not_immediate_grants(clock):
    bucket = TokenBucket(1, 2, clock=clock)
    bucket.acquire(2, timeout=0)  # granted at once: no wait
    with pytest.raises(RateLimitExceeded):
        bucket.acquire(1, timeout=0)  # empty: refused without waiting
    with pytest.raises(RateLimitExceeded):
        bucket.acquire(3)  # more than the capacity
    assert bucket.try_acquire(1) is False  # a try is not a refused acquire
    snap = bucket.snapshot()
    assert (snap["waits"], snap["waited_s"], snap["rejections"]) == (0, 0.0, 2)


def test_bucket_counts_the_time_a_blocked_acquire_waited():
    bucket = TokenBucket(50, 1)  # a token every 20 ms, real clock
    bucket.acquire(1)
    began = time.monotonic()
    bucket.acquire(1, timeout=2)
    waited = time.monotonic() - began
    snap = bucket.snapshot()
    assert (snap["waits"], snap["rejections"]) == (1, 0)
    assert 0.0 < snap["waited_s"] <= waited


def test_waiters_are_served_in_arrival_order_and_try_acquire_does_not_overtake():
    bucket = TokenBucket(10, 10)
    bucket.acquire(10, timeout=0)
    order = []

    def take(label, n):
        bucket.acquire(n, timeout=3)
        order.append(label)

    big = threading.Thread(target=take, args=("big", 5))
    big.start()
    _wait_for(lambda: bucket.waiting() == 1)
    small = threading.Thread(target=take, args=("small", 1))
    small.start()
    _wait_for(lambda: bucket.waiting() == 2)
    _wait_for(lambda: bucket.available() >= 1)
    assert bucket.try_acquire(1) is False, "try_acquire must not jump the queue"
    big.join(3)
    small.join(3)
    assert order == ["big", "small"]


def _wait_for(predicate, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        pause.wait(0.005)


# -- estimates --------------------------------------------------------------------------------


def test_estimate_tokens_counts_text_messages_and_max_tokens():
    assert estimate_tokens({"messages": MSGS}) == 14
    assert estimate_tokens({"messages": MSGS, "max_tokens": 100}) == 114
    assert estimate_tokens({"messages": MSGS, "max_tokens": 100, "n": 2}) == 214
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 8}, {"type": "image_url"}]}]
    assert estimate_tokens({"messages": parts}) == 2 + 4
    assert estimate_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_tokens(None) == 0
    assert usage_tokens(OK) == 30
    assert usage_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == 7
    assert usage_tokens({"usage": "junk"}) is None


# -- through the Client ----------------------------------------------------------------------


def test_tpm_is_reserved_from_the_estimate_and_reconciled_from_usage(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK)
    seen = []

    class Recorder(TokenBucket):
        def acquire(self, n=1, timeout=None):
            seen.append((self.name, "acquire", n))
            super().acquire(n, timeout)

        def adjust(self, delta):
            seen.append((self.name, "adjust", delta))
            super().adjust(delta)

    client = make_client([{"id": "a", "base_url": A}], clock=clock, sleep=clock.sleep,
                         tokens_per_minute=600, model_rate_limits={"m": {"tokens_per_minute": 1200}},
                         rate_limit_burst_s=30,  # bursts of 300 and 600 tokens: the call fits
                         rate_limiter_factory=lambda name, rate, cap: Recorder(rate, cap, clock=clock, name=name))
    client.chat_completion(MSGS, model="m", max_tokens=100)
    assert seen == [("tokens", "acquire", 114), ("tokens:m", "acquire", 114),
                    ("tokens", "adjust", 30 - 114), ("tokens:m", "adjust", 30 - 114)]
    limits = client.stats()["rate_limits"]
    assert limits["tokens"]["available"] == 300 - 30  # the burst, less what the call used
    assert limits["tokens:m"]["available"] == 600 - 30


def test_a_failed_call_gives_its_token_estimate_back_but_not_its_request(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=500)
    client = make_client([{"id": "a", "base_url": A}], clock=clock, sleep=clock.sleep,
                         requests_per_minute=10, tokens_per_minute=600, max_retries=0)
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="m", max_tokens=100)
    limits = client.stats()["rate_limits"]
    assert limits["tokens"]["available"] == 10  # the whole burst (600/60) is back, no more
    assert limits["requests"]["available"] == 0  # the burst of one request was used


def test_rpm_blocks_within_the_deadline_then_raises_without_sending(rsps, make_client):
    rsps.post(A + "/chat/completions", json=OK)
    client = make_client([{"id": "a", "base_url": A}], requests_per_minute=3)
    client.chat_completion(MSGS, model="m")  # the burst: one request; the next is due in 30 s
    began = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        client.chat_completion(MSGS, model="m", deadline_s=0.2)
    waited = time.monotonic() - began
    assert 0.15 <= waited < 1.0, "it waited for tokens until the call's deadline, no longer"
    assert info.value.limiter == "requests"
    assert len(rsps.calls) == 1
    limit = client.stats()["rate_limits"]["requests"]
    assert limit["waiting"] == 0
    assert (limit["waits"], limit["rejections"]) == (1, 1)  # it waited, then was refused
    assert 0.15 <= limit["waited_s"] < 1.0


@pytest.mark.parametrize("options, field", [
    ({"requests_per_minute": 0}, "requests_per_minute"),
    ({"tokens_per_minute": float("inf")}, "tokens_per_minute"),
    ({"model_rate_limits": {"m": {"rpm": 5}}}, "model_rate_limits[m]"),
    ({"model_rate_limits": {"m": {"tokens_per_minute": -1}}}, "model_rate_limits[m].tokens_per_minute"),
    ({"model_rate_limits": [("m", 1)]}, "model_rate_limits"),
    ({"rate_limiter_factory": "redis"}, "rate_limiter_factory"),
    ({"rate_limit_burst_s": 0}, "rate_limit_burst_s"),
    ({"rate_limit_burst_s": 60}, "rate_limit_burst_s"),
    ({"rate_limit_burst_s": "1"}, "rate_limit_burst_s"),
    ({"rate_limit_burst_s": True}, "rate_limit_burst_s"),
])
def test_rate_limit_settings_are_validated(make_client, options, field):
    with pytest.raises(ConfigError) as info:
        make_client([{"id": "a", "base_url": A}], **options)
    assert info.value.field == field
