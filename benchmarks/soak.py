"""Soak: 100,000 calls over 64 threads against four faulty simulated nodes, memory traced.

The CI stress test's scenario (``tests/stress/scenario.py``: 5% 5xx, 2% connection
resets, 1% malformed JSON on every node, one node flapping, one hanging), run for much
longer, with the hang repeating. ``tracemalloc`` measures the memory the process holds
after the warm-up and after each batch; the run fails when the median of the last three
samples exceeds the median of the first three by more than ``--max-growth-mib`` (the
number of open connections makes single samples vary by a MiB or so; a leak of 40 bytes
per call would add 4 MiB over the run). At the end every counter must reconcile as in the CI test, nothing
may be in flight, and the client's threads must be gone after ``close()``.

    python benchmarks/soak.py [--calls 100000] [--threads 64] [--seed 11] [--max-growth-mib 4]

Not run by CI (it takes minutes: tracing every allocation slows Python down a lot).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
import tracemalloc
from typing import List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb import Client  # noqa: E402
from holysheep_lb.loadgen import run_load  # noqa: E402
from holysheep_lb.simulator import SimulatedGateway  # noqa: E402
from tests.stress.scenario import (  # noqa: E402
    CHAT_PATH, CLIENT_OPTIONS, NODES, Chaos, Tally, attempts_by_node, counter_mismatches, gateway_mismatches,
    late_answers, one_call, wait_until,
)


def traced_mib() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / (1024 * 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=5_000, help="calls before the memory baseline")
    ap.add_argument("--batches", type=int, default=20, help="memory samples after the warm-up")
    ap.add_argument("--max-growth-mib", type=float, default=4.0)
    args = ap.parse_args()
    command = (f"python benchmarks/soak.py --calls {args.calls} --threads {args.threads} --seed {args.seed} "
               f"--warmup {args.warmup} --batches {args.batches} --max-growth-mib {args.max_growth_mib:g}")
    print(f"$ {command}\n")

    problems: List[str] = []
    tally = Tally()
    samples: List[float] = []
    started = time.perf_counter()
    with SimulatedGateway(NODES, seed=args.seed) as gateway:
        baseline_threads = threading.active_count()
        client = Client(api_key="sk-soak", nodes=gateway.client_nodes(), **CLIENT_OPTIONS)
        done = 0

        def batch(n: int) -> None:
            nonlocal done
            first = done
            run_load(lambda i: one_call(client, first + i, tally), requests=n, concurrency=args.threads)
            done += n

        with Chaos(gateway, hang_every_s=20.0, max_s=24 * 3600.0) as chaos:
            tracemalloc.start()
            batch(min(args.warmup, args.calls))
            samples.append(traced_mib())
            measured = args.calls - done
            for k in range(args.batches):
                n = measured // args.batches + (1 if k < measured % args.batches else 0)
                if n:
                    batch(n)
                    samples.append(traced_mib())
                    print(f"  {done:>7} calls  {time.perf_counter() - started:7.1f} s  "
                          f"traced {samples[-1]:6.2f} MiB", flush=True)
            snapshot = tracemalloc.take_snapshot()
        stats = client.stats()
        nodes = attempts_by_node(client)
        problems += counter_mismatches(stats, tally)
        if not wait_until(lambda: not gateway_mismatches(gateway, nodes, allow_late=True), 10.0):
            problems += gateway_mismatches(gateway, nodes, allow_late=True)
        late = late_answers(gateway, nodes)
        health = client.health_checker
        if health is None or not health.running or health.loop_errors:
            problems.append("the health thread died or hit errors")
        client.close()
        if not wait_until(lambda: threading.active_count() == baseline_threads, 10.0):
            problems.append(f"threads after close(): {threading.active_count()} (baseline {baseline_threads})")
        outcomes = {n: gateway.outcomes(n, CHAT_PATH) for n in nodes}
    tracemalloc.stop()

    wall_s = time.perf_counter() - started
    growth = statistics.median(samples[-3:]) - statistics.median(samples[:3])
    if growth > args.max_growth_mib:
        problems.append(f"memory grew {growth:.2f} MiB > {args.max_growth_mib:g} MiB")
    latency = stats["latency"]
    print(f"\n{tally.calls} calls ({tally.streams} streams) over {args.threads} threads in {wall_s:.0f} s; "
          f"{chaos.flaps} flaps, {chaos.hangs} hangs")
    print(f"succeeded {tally.successes / tally.calls:.3%}; typed errors {dict(tally.errors)}; "
          f"untyped {tally.escaped_count}")
    print(f"latency of successful calls: p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, "
          f"max {latency['max_ms']:.0f} ms")
    print(f"attempts per call {tally.attempts / tally.calls:.3f}; in flight at the end {stats['in_flight']}; "
          f"answers written after the client's timeout {late}")
    for node_id, node in nodes.items():
        failures = {k: v for k, v in node["failures"].items() if v}
        print(f"  node {node_id}: {node['requests']} attempts, {node['successes']} ok, failures {failures}; "
              f"gateway saw {outcomes[node_id]}")
    print(f"memory traced after warm-up: {samples[0]:.2f} -> {samples[-1]:.2f} MiB; growth (median of the "
          f"last 3 samples - median of the first 3) {growth:+.2f} MiB, bound {args.max_growth_mib:g} MiB; "
          f"samples from {min(samples):.2f} to {max(samples):.2f} MiB")
    print("largest holders at the end, by line:")
    for stat in snapshot.statistics("lineno")[:5]:
        print(f"  {stat}")
    print("\nchecks: " + ("all passed" if not problems else "FAILED"))
    for problem in problems:
        print(f"  - {problem}")
    print(f"\nReproduce: {command}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
