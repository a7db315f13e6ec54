"""The per-minute rule: no limit admits more than its number in any 60 s window.

Every test records each grant at the bucket's own time (its refill stamp, under its lock)
and slides a closed 60 s window across the whole run, starting it at every grant (the
fullest window starts at one).
"""

import random
import threading
import time

import pytest

from holysheep_lb import TokenBucket
from holysheep_lb.errors import RateLimitExceeded
from holysheep_lb.ratelimit import RateLimits, minute_bucket_shape


class RecordingBucket(TokenBucket):
    """Records (bucket time, amount) of every grant and every correction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def _take(self, n):
        super()._take(n)
        self.events.append((self._stamp, n))


def fullest_window(events, window_s=60.0):
    """The most admitted in any closed window of ``window_s`` (two pointers over sorted grants)."""
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


def minute_bucket(per_minute, burst_s=1.0, *, whole=True, clock, window_s=60.0):
    rate_per_s, burst = minute_bucket_shape(per_minute, burst_s, whole=whole)
    scale = 60.0 / window_s  # the same rule over a shorter window (real-clock tests)
    return RecordingBucket(rate_per_s * scale, burst, max_take=per_minute, clock=clock)


def test_the_window_checker_catches_the_old_full_minute_burst(clock):
    old = RecordingBucket(600 / 60.0, 600, clock=clock)  # 0.1's rule: a minute's burst, then the rate
    for _ in range(60 * 4):
        while old.try_acquire():
            pass
        clock.advance(0.25)
    assert fullest_window(old.events) > 1100, "the old rule admits about 2N in the first minute"


@pytest.mark.parametrize("per_minute, burst_s", [(600, 1.0), (600, 10.0), (61, 1.0), (7, 1.0), (1, 1.0)])
def test_requests_per_minute_holds_over_every_60_s_window_and_keeps_the_pace(clock, per_minute, burst_s):
    bucket = minute_bucket(per_minute, burst_s, clock=clock)
    for _ in range(4 * 300):  # 300 s, greedy
        while bucket.try_acquire():
            pass
        clock.advance(0.25)
    assert fullest_window(bucket.events) <= per_minute
    rate_per_s, burst = minute_bucket_shape(per_minute, burst_s, whole=True)
    assert len(bucket.events) >= burst + rate_per_s * 299.75 - 2  # and it keeps its pace (0.25 s steps)


def test_a_fresh_limit_lets_one_burst_through_not_a_minute(clock):
    bucket = minute_bucket(600, clock=clock)
    admitted = 0
    while bucket.try_acquire():
        admitted += 1
    assert admitted == 10  # one second's worth: 622 in 1.5 s before


def test_calls_larger_than_the_burst_pass_after_an_idle_spell_and_leave_debt(clock):
    bucket = minute_bucket(6000, clock=clock, whole=False)  # burst 100 tokens, refill 98.33/s
    bucket.acquire(1000, timeout=0)  # a new bucket is as if idle for a minute
    assert bucket.available() == pytest.approx(100 - 1000)
    with pytest.raises(RateLimitExceeded) as info:
        bucket.acquire(500, timeout=0)
    assert info.value.retry_after_s == pytest.approx(1400 / (5900 / 60))
    with pytest.raises(RateLimitExceeded):
        bucket.acquire(6001, timeout=0)  # more than the minute: never


def test_tokens_per_minute_with_random_sizes_and_settlement_hold_over_every_window(clock):
    rng = random.Random(7)
    per_minute = 10000
    bucket = minute_bucket(per_minute, clock=clock, whole=False)
    used = []  # (time, tokens really used): settled estimates
    for _ in range(10 * 400):  # 400 s in 0.1 s steps
        clock.advance(0.1)
        if rng.random() < 0.5:
            continue
        estimate = rng.choice([20, 150, 400, 1200])
        if bucket.try_acquire(estimate):
            actual = rng.randint(estimate // 4, estimate + estimate // 4)
            used.append((clock(), actual))
            bucket.adjust(actual - estimate)  # settle at once: over and under estimates
    # what went through (each take, debts included) and what was really used both hold
    assert fullest_window(bucket.events) <= per_minute + 1200 // 4  # a settled debt may overshoot by itself
    assert fullest_window(used) <= per_minute + 1200 // 4
    assert fullest_window([e for e in bucket.events if e[1] in (20, 150, 400, 1200)]) <= per_minute


def test_thirty_two_threads_hammering_rpm_never_exceed_it_on_a_fake_clock(clock):
    """32 real threads, a fake clock moved in rounds by the test: deterministic and bounded."""
    per_minute, threads, rounds = 120, 32, 4 * 200  # 200 s in 0.25 s steps
    limits = RateLimits(requests_per_minute=per_minute, tokens_per_minute=12000,
                        factory=lambda name, rate, cap: RecordingBucket(
                            rate, cap, max_take=cap + 60 * rate, clock=clock, name=name),
                        clock=clock)
    requests_limit = limits.limiters(None)[0][0]
    tokens_limit = limits.limiters(None)[1][0]
    start, done = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
    refused = [0] * threads

    def worker(i):
        for _ in range(rounds):
            start.wait()
            for _ in range(3):
                try:
                    limits.reserve(None, 50 + 10 * (i % 4), timeout_s=0).settle(40)
                except RateLimitExceeded:
                    refused[i] += 1
            done.wait()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for _ in range(rounds):
        start.wait(10)
        done.wait(10)
        clock.advance(0.25)
    for t in pool:
        t.join(10)
    assert not any(t.is_alive() for t in pool)
    grants = [e for e in requests_limit.events if e[1] == 1]
    assert fullest_window(grants) <= per_minute
    assert len(grants) >= (per_minute - 2) / 60 * 200  # the pace, for the whole run
    token_takes = [e for e in tokens_limit.events if e[1] >= 50]
    assert fullest_window(token_takes) <= 12000
    assert sum(refused) > 0


def test_thirty_two_threads_blocking_in_acquire_never_exceed_the_window_on_a_real_clock():
    """The blocking path (C-level queues, timeouts) with a 0.4 s window standing in for the minute."""
    window_s, per_window = 0.4, 40
    bucket = minute_bucket(per_window, clock=time.monotonic, window_s=window_s)
    stop = threading.Event()
    timeouts = []

    def worker():
        while not stop.is_set():
            try:
                bucket.acquire(1, timeout=0.05)
            except RateLimitExceeded:
                timeouts.append(1)

    pool = [threading.Thread(target=worker) for _ in range(32)]
    for t in pool:
        t.start()
    stop.wait(1.5)
    stop.set()
    for t in pool:
        t.join(5)
    assert not any(t.is_alive() for t in pool)
    assert bucket.waiting() == 0
    assert fullest_window(bucket.events, window_s) <= per_window
    assert len(bucket.events) > per_window * 2  # it kept admitting at its pace
    assert timeouts
