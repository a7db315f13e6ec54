"""Hedging and the retry budget, each measured on/off side by side on the simulated gateway.

1. Hedged requests off vs on, on the seed article's four regional nodes (one with a
   heavy tail and ~2% 5xx): p50/p95/p99 seen by callers, and the extra requests sent.
2. Retry budget on vs off, on four nodes that fail 50% (then 100%) of requests with a
   5xx: requests the gateway received per call, and the calls that succeeded.

Configurations alternate round by round on the same gateway, so drift hits both
sides alike. Model breakers are off in part 2, to measure the budget alone.

    python benchmarks/resilience.py [--calls 1200] [--threads 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb import Client  # noqa: E402
from holysheep_lb.loadgen import LoadResult, percentile, run_load, seed_regions  # noqa: E402
from holysheep_lb.simulator import SimulatedGateway  # noqa: E402

MSGS = [{"role": "user", "content": "Summarise the tail at scale in one line."}]


def run(gw: SimulatedGateway, label: str, calls: int, threads: int, **options: Any) -> Tuple[LoadResult, int, Dict]:
    """``calls`` chat completions over ``threads`` threads with a fresh client."""
    gw.reset_counts()
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None, **options) as client:
        result = run_load(lambda i: client.chat_completion(MSGS, model="gpt-4.1"),
                          requests=calls, concurrency=threads, label=label)
        stats = client.stats()
    return result, sum(gw.counts().values()), stats


def merge(parts: List[Tuple[LoadResult, int, Dict]]) -> Dict[str, Any]:
    latencies = sorted(x for r, _, _ in parts for x in r.latencies_ms)
    calls = sum(r.calls for r, _, _ in parts)
    ok = len(latencies)
    sent = sum(n for _, n, _ in parts)
    hedges = [s["hedges"] for _, _, s in parts if s["hedges"]]
    return {
        "calls": calls,
        "ok": ok,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "requests_per_call": sent / calls,
        "hedges_sent": sum(h["sent"] for h in hedges),
        "hedges_won": sum(h["won"] for h in hedges),
    }


def side_by_side(gw: SimulatedGateway, configs: Dict[str, Dict[str, Any]], *, calls: int, threads: int,
                 rounds: int) -> Dict[str, Dict[str, Any]]:
    parts: Dict[str, List] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, options in configs.items():
            parts[name].append(run(gw, name, calls // rounds, threads, **options))
    return {name: merge(p) for name, p in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1200, help="calls per configuration")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"$ python benchmarks/resilience.py --calls {args.calls} --threads {args.threads} "
          f"--rounds {args.rounds}\n")
    run_args = dict(calls=args.calls, threads=args.threads, rounds=args.rounds)

    print("1. Hedged requests on the seed's four regions (ap-northeast: p50 140 ms, p99 1250 ms, 2.3% 5xx)")
    print(f"{'strategy':<12} {'hedging':<26} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
          f"{'req/call':>9} {'hedges sent/won':>16}")
    with SimulatedGateway(seed_regions(), seed=7) as gw:
        for strategy in ("round_robin", "adaptive"):
            configs = {
                "off": dict(strategy=strategy),
                "after 0.2 s, cap 5%": dict(strategy=strategy, hedge_delay_s=0.2),
                "after node p95, cap 5%": dict(strategy=strategy, hedge_delay_s="p95"),
                "after 0.2 s, cap 20%": dict(strategy=strategy, hedge_delay_s=0.2, hedge_max_ratio=0.2),
            }
            results = side_by_side(gw, configs, **run_args)
            for name, r in results.items():
                print(f"{strategy:<12} {name:<26} {r['p50']:>7.0f} {r['p95']:>7.0f} {r['p99']:>7.0f} "
                      f"{r['requests_per_call']:>9.3f} {r['hedges_sent']:>8}/{r['hedges_won']:<7}")
            off, on = results["off"], results["after 0.2 s, cap 5%"]
            print(f"{'':<12} p99 on/off (0.2 s, 5%): {on['p99'] / off['p99']:.2f}; extra requests: "
                  f"{(on['requests_per_call'] - off['requests_per_call']) * 100:+.1f} per 100 calls")

    print("\n2. Retry budget (20% of calls + 1/s) on four nodes failing with 5xx; max_retries=3")
    print(f"{'failing':<9} {'budget':<7} {'req/call':>9} {'succeeded':>10}")
    nodes = [{"id": f"n{i}", "latency_ms": 5, "error_rate": 0.5} for i in range(4)]
    with SimulatedGateway(nodes, seed=7) as gw:
        for rate in (0.5, 1.0):
            for node in nodes:
                gw.configure(node["id"], error_rate=rate)
            configs = {"off": dict(breaker=None, retry_budget_ratio=None), "on": dict(breaker=None)}
            results = side_by_side(gw, configs, **run_args)
            for name, r in results.items():
                print(f"{rate:<9.0%} {name:<7} {r['requests_per_call']:>9.3f} {r['ok'] / r['calls']:>10.1%}")
            print(f"{'':<9} requests per call on/off: "
                  f"{results['on']['requests_per_call'] / results['off']['requests_per_call']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
