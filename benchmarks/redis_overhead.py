"""Per-call cost of the Redis-shared rate limiter, breaker and budget vs the in-memory ones.

Starts its own redis-server on 127.0.0.1 (or uses --url). Each round times every
variant in turn (in-memory and Redis side by side, interleaved), one call after another
from one thread; the reported number is the median over rounds of microseconds per
call. A call is what the client does per model call:

* limiter: ``acquire(1)`` on a bucket that never runs dry
* breaker: ``admit`` a call, then record its success
* budget:  ``try_reserve`` against a daily cap, then ``settle``
* PING:    one bare Redis round trip, for scale

    python benchmarks/redis_overhead.py [--calls 2000] [--rounds 5] [--url redis://...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from decimal import Decimal
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb.breakers import BreakerBoard  # noqa: E402
from holysheep_lb.config import BreakerSettings  # noqa: E402
from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.pricing import InMemorySpendStore, Limit, Reservation, SpendStore  # noqa: E402
from holysheep_lb.ratelimit import TokenBucket  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

LIMITS = [Limit(None, "day", Decimal("1000000"))]


def limiter_call(limiter) -> Callable[[], None]:
    return lambda: limiter.acquire(1)


def breaker_call(board: BreakerBoard) -> Callable[[], None]:
    return lambda: board.admit("model", "gpt-4.1").record(None)


def budget_call(store: SpendStore) -> Callable[[], None]:
    def call() -> None:
        reservation = Reservation("gpt-4.1", "2026-11-26", 100, 10, Decimal("0.00028"))
        store.try_reserve(reservation, LIMITS)
        store.settle(reservation, input_tokens=100, output_tokens=10, cost_usd=Decimal("0.00028"))
    return call


def us_per_call(call: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls * 1e6


def run(url: str, calls: int, rounds: int) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    shared = RedisSharedState(url, prefix=f"bench{uuid.uuid4().hex[:8]}:")
    huge = 1e12
    variants = {
        ("limiter", "memory"): limiter_call(TokenBucket(huge, huge)),
        ("limiter", "redis"): limiter_call(shared.rate_limiter_factory("requests", huge, huge)),
        ("breaker", "memory"): breaker_call(BreakerBoard(model_settings=BreakerSettings())),
        ("breaker", "redis"): breaker_call(BreakerBoard(model_settings=BreakerSettings(),
                                                        storage_factory=shared.breaker_storage)),
        ("budget", "memory"): budget_call(InMemorySpendStore()),
        ("budget", "redis"): budget_call(shared.spend_store),
        ("PING", "redis"): shared.redis.ping,  # one bare round trip, for scale
    }
    for call in variants.values():  # warm up: connections, script loading
        us_per_call(call, 50)
    trips = {what: round_trips(shared, variants[(what, "redis")]) for what, _ in variants}
    samples: Dict[str, List[float]] = {f"{what} {where}": [] for what, where in variants}
    for _ in range(rounds):
        for (what, where), call in variants.items():
            samples[f"{what} {where}"].append(us_per_call(call, calls))
    shared.redis.delete(*shared.redis.keys(f"{shared.prefix}*"))
    shared.close()
    return samples, trips


def round_trips(shared: RedisSharedState, call: Callable[[], None], calls: int = 100) -> float:
    """Redis commands sent per call (each one a round trip)."""
    client = shared.redis
    counted = [0]
    send = client.execute_command

    def counting(*args, **options):
        counted[0] += 1
        return send(*args, **options)

    client.execute_command = counting
    try:
        for _ in range(calls):
            call()
    finally:
        del client.execute_command
    return counted[0] / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--url", help="an existing Redis (default: start redis-server on a free port)")
    args = ap.parse_args()
    if args.url:
        samples, trips = run(args.url, args.calls, args.rounds)
    else:
        with RedisServer() as server:
            samples, trips = run(server.url, args.calls, args.rounds)
    print(f"{'per call':<10} {'in-memory µs':>13} {'Redis µs':>10} {'Redis round trips':>18}")
    for what in ("limiter", "breaker", "budget", "PING"):
        memory = f"{statistics.median(samples[f'{what} memory']):.1f}" if f"{what} memory" in samples else "-"
        shared = statistics.median(samples[f"{what} redis"])
        print(f"{what:<10} {memory:>13} {shared:>10.1f} {trips[what]:>18g}")
    print(f"\nmedian of {args.rounds} rounds of {args.calls} calls each, one thread, Redis on loopback")
    print("reproduce: python benchmarks/redis_overhead.py "
          f"--calls {args.calls} --rounds {args.rounds}" + (f" --url {args.url}" if args.url else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
