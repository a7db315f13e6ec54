"""Rate-limit semantics and connection pools, 0.1's settings beside today's, in one run.

1. ``requests_per_minute=600`` (and ``tokens_per_minute``) driven greedily on a fake clock for
   3 minutes: the most admitted in any 60 s window, in the first 1.5 s, and the pace after
   the first minute. 0.1's rule (a bucket of a minute's capacity) beside today's (a burst
   of ``rate_limit_burst_s`` seconds' worth, default 1, and a refill of the rest).
2. 96 threads over 2 loopback nodes (50 ms per answer): "Connection pool is full"
   warnings, connections the servers accepted, and calls/s, with ``pool_maxsize=32``
   (0.1's default) beside today's default.

    python benchmarks/ratelimit_pools.py [--threads 96] [--calls 20] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb import Client, ClientConfig, TokenBucket  # noqa: E402
from holysheep_lb.ratelimit import minute_bucket_shape  # noqa: E402

ANSWER = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


# -- 1. the per-minute rule ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fullest(events: List[Tuple[float, float]], window_s: float = 60.0) -> float:
    best = total = 0.0
    j = 0
    for i, (at, n) in enumerate(events):
        total += n
        while at - events[j][0] > window_s:
            total -= events[j][1]
            j += 1
        best = max(best, total)
    return best


def drive(bucket: TokenBucket, clock: _Clock, sizes: List[float], step_s: float = 0.05,
          run_s: float = 180.0) -> Dict[str, float]:
    """Greedy callers: every step, take calls (sizes in turn) until the bucket refuses one."""
    events: List[Tuple[float, float]] = []
    k = 0
    while clock.now < run_s:
        while bucket.try_acquire(sizes[k % len(sizes)]):
            events.append((clock.now, sizes[k % len(sizes)]))
            k += 1
        clock.now += step_s
    return {"fullest_60s": _fullest(events),
            "first_1.5s": sum(n for at, n in events if at < 1.5),
            "per_min_after_1st": sum(n for at, n in events if at >= 60) / ((run_s - 60) / 60)}


def rule_rows(per_minute: float, sizes: List[float], whole: bool) -> List[Tuple[str, Dict[str, float]]]:
    rows = []
    clock = _Clock()
    old = TokenBucket(per_minute / 60, per_minute, clock=clock)
    rows.append(("0.1: capacity = a minute", drive(old, clock, sizes)))
    for burst_s in (1.0, 10.0):
        clock = _Clock()
        rate, burst = minute_bucket_shape(per_minute, burst_s, whole=whole)
        bucket = TokenBucket(rate, burst, max_take=per_minute, clock=clock)
        rows.append((f"now: burst {burst_s:g} s ({burst:g})", drive(bucket, clock, sizes)))
    return rows


# -- 2. pools --------------------------------------------------------------------------------


class _Node(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, latency_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.latency_s = latency_s
        self.accepted = 0
        self.accepted_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.accepted_lock:
            self.accepted += 1
        super().process_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        threading.Event().wait(self.server.latency_s)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args: Any) -> None:
        pass


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.full = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Connection pool is full" in record.getMessage():
            self.full += 1


def pool_row(threads: int, calls: int, latency_s: float, **options: Any) -> Dict[str, float]:
    nodes = [_Node(latency_s), _Node(latency_s)]
    servers = [threading.Thread(target=n.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for n in nodes]
    for s in servers:
        s.start()
    counter = _Count()
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    urllib3_log.addHandler(counter)
    errors = [0]
    try:
        with Client(nodes=[{"id": f"n{i}", "base_url": f"http://127.0.0.1:{n.server_port}/v1"}
                           for i, n in enumerate(nodes)],
                    api_key="sk-bench", health_check_interval_s=None, deadline_s=60.0, **options) as client:
            start = threading.Barrier(threads + 1)

            def worker() -> None:
                start.wait()
                for _ in range(calls):
                    try:
                        client.chat_completion([{"role": "user", "content": "hi"}], model="m")
                    except Exception:  # counted and printed
                        errors[0] += 1

            pool = [threading.Thread(target=worker) for _ in range(threads)]
            for t in pool:
                t.start()
            start.wait()
            began = time.monotonic()
            for t in pool:
                t.join()
            elapsed = time.monotonic() - began
    finally:
        urllib3_log.removeHandler(counter)
        for n in nodes:
            n.shutdown()
            n.server_close()
    return {"pool_full_warnings": counter.full, "connections": sum(n.accepted for n in nodes),
            "calls_per_s": threads * calls / elapsed, "errors": errors[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=96)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    print("reproduce: python benchmarks/ratelimit_pools.py "
          f"--threads {args.threads} --calls {args.calls} --latency-ms {args.latency_ms:g}\n")

    print("1. requests_per_minute=600, greedy callers, fake clock, 3 minutes")
    print(f"   {'rule':28} {'fullest 60 s':>12} {'first 1.5 s':>12} {'per min after':>14}")
    for name, r in rule_rows(600, [1], whole=True):
        print(f"   {name:28} {r['fullest_60s']:12.0f} {r['first_1.5s']:12.0f} {r['per_min_after_1st']:14.1f}")
    rng = random.Random(1)
    sizes = [float(rng.choice([200, 800, 1500, 3000])) for _ in range(97)]
    print("   tokens_per_minute=90000, calls of 200..3000 tokens")
    for name, r in rule_rows(90000, sizes, whole=False):
        print(f"   {name:28} {r['fullest_60s']:12.0f} {r['first_1.5s']:12.0f} {r['per_min_after_1st']:14.1f}")

    print(f"\n2. {args.threads} threads over 2 loopback nodes, {args.latency_ms:g} ms per answer, "
          f"{args.calls} calls each")
    print(f"   {'pool_maxsize':28} {'pool full warnings':>18} {'connections':>12} {'calls/s':>8} {'errors':>7}")
    for label, options in (("32 (0.1's default)", {"pool_maxsize": 32}),
                           (f"{ClientConfig.__dataclass_fields__['pool_maxsize'].default} (default)", {})):
        r = pool_row(args.threads, args.calls, args.latency_ms / 1000.0, **options)
        print(f"   {label:28} {r['pool_full_warnings']:18d} {r['connections']:12d} {r['calls_per_s']:8.0f} "
              f"{r['errors']:7d}")


if __name__ == "__main__":
    main()
