"""Routing strategies side by side on the simulated gateway (three scenarios).

    python benchmarks/strategies.py [--requests 2000] [--scenario regions,capacity,failover]

regions   the article's 4 regional nodes (ap-northeast: heavy tail, 2.3% 5xx), 32 threads.
          Targets: adaptive p99 <= 1.5 x fastest-node-only p99 and <= 0.5 x round_robin
          p99; caller error rate 0.
capacity  capacities 4, 4, 8, 16 at equal latency (50 ms), 32 threads (= total
          capacity), each node's weight set to its capacity as an operator would.
          Ideal throughput = 32 / 0.05 s. Target: adaptive and least_connections
          >= 0.85 of ideal. Two extra rows show what is reached with no weights at all.
failover  4 equal nodes for 10 s; one refuses connections from 3 s, another hangs
          from 6 s. Target: 0 caller errors; no second below 60% of normal throughput.

The gateway runs in a child process so its CPU use does not skew our latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _simproc import GatewayProcess  # noqa: E402
from holysheep_lb import Client  # noqa: E402
from holysheep_lb.loadgen import LoadResult, run_load, seed_regions  # noqa: E402
from holysheep_lb.selection import Adaptive  # noqa: E402

ADAPTIVE_OPTIONS: Dict[str, float] = {}


def strategy_for(name: str) -> Any:
    return Adaptive(**ADAPTIVE_OPTIONS) if name == "adaptive" and ADAPTIVE_OPTIONS else name

MSGS = [{"role": "user", "content": "benchmark"}]
STRATEGIES = ["round_robin", "weighted", "least_connections", "geographic", "adaptive"]


def drive(gw: GatewayProcess, nodes: List[Dict[str, Any]], label: str, requests: int,
          concurrency: int, timeline=None, **client_kw: Any) -> LoadResult:
    """Warm up, then run ``requests`` calls; ``timeline`` is [(at_s, action)], and when
    given the run stops at its last entry instead (a time-based run)."""
    client_kw.setdefault("health_check_interval_s", 1.0)
    client_kw.setdefault("read_timeout_s", 2.0)
    if "strategy" in client_kw:
        client_kw["strategy"] = strategy_for(client_kw["strategy"])
    client = Client(nodes=nodes, **client_kw)
    try:
        # warm-up: connections and first latency samples, not measured
        run_load(lambda i: client.chat_completion(MSGS, model="gpt-4.1"), requests=concurrency * 2,
                 concurrency=concurrency)
        stop = threading.Event()
        timers = []
        for at_s, action in timeline or []:
            timer = threading.Timer(at_s, action)
            timer.daemon = True
            timers.append(timer)
        if timeline:
            timers.append(threading.Timer(timeline[-1][0], stop.set))
            requests = 10 ** 7
        for timer in timers:
            timer.start()
        result = run_load(lambda i: client.chat_completion(MSGS, model="gpt-4.1"), requests=requests,
                          concurrency=concurrency, label=label, stop=stop)
        for timer in timers:
            timer.cancel()
        assert client.stats()["in_flight"] == 0
        return result
    finally:
        client.close()


def table(title: str, rows: List[Dict[str, Any]], extra: Optional[str] = None) -> None:
    print(f"\n## {title}\n")
    head = f"| {'configuration':<28} | p50 ms | p95 ms | p99 ms | req/s | caller errors | node share |"
    print(head)
    print("|" + "---|" * 7)
    for r in rows:
        share = " ".join(f"{k.split('-')[0]}:{v:.0%}" for k, v in r["node_share"].items())
        extra_cell = f" ({r[extra]})" if extra and extra in r else ""
        print(f"| {r['label']:<28} | {r['p50_ms']:>6} | {r['p95_ms']:>6} | {r['p99_ms']:>6} | "
              f"{r['throughput_rps']:>5}{extra_cell} | {r['error_rate']:.2%} | {share} |")


def scenario_regions(n: int) -> Dict[str, Any]:
    spec = seed_regions()
    rows = []
    with GatewayProcess(spec) as gw:
        nodes = gw.client_nodes
        fastest = [nd for nd in nodes if nd["id"] == "us-east-1"]
        rows.append(drive(gw, fastest, "fastest node only (oracle)", n, 32, max_retries=0).summary())
        slow = [nd for nd in nodes if nd["id"] == "ap-northeast-1"]
        rows.append(drive(gw, slow, "single node (ap-northeast)", n, 32, max_retries=0).summary())
        for s in STRATEGIES:
            rows.append(drive(gw, nodes, s, n, 32, strategy=s, default_region="us-east").summary())
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive p99 <= 1.5 x fastest-node p99":
            by["adaptive"]["p99_ms"] <= 1.5 * by["fastest node only (oracle)"]["p99_ms"],
        "adaptive p99 <= 0.5 x round_robin p99": by["adaptive"]["p99_ms"] <= 0.5 * by["round_robin"]["p99_ms"],
        "adaptive caller error rate == 0": by["adaptive"]["error_rate"] == 0,
    }
    table("regions: the article's 4 nodes, 32 threads", rows)
    return {"rows": rows, "checks": checks}


def scenario_capacity(n: int) -> Dict[str, Any]:
    caps = [4, 4, 8, 16]
    spec = [{"id": f"cap{c}-{i}", "latency_ms": 50, "capacity": c} for i, c in enumerate(caps)]
    ideal = sum(caps) / 0.050
    rows = []
    with GatewayProcess(spec) as gw:
        # Operators declare a node's capacity as its weight (as with nginx upstreams).
        weighted_nodes = [dict(nd, weight=c) for nd, c in zip(gw.client_nodes, caps)]
        runs = [(s, s, weighted_nodes) for s in STRATEGIES]
        runs += [(f"{s} (no weights)", s, gw.client_nodes) for s in ("least_connections", "adaptive")]
        for label, s, nodes in runs:
            r = drive(gw, nodes, label, n, sum(caps), strategy=s).summary()
            r["of_ideal"] = f"{r['throughput_rps'] / ideal:.2f} of ideal"
            r["ratio"] = r["throughput_rps"] / ideal
            rows.append(r)
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive >= 0.85 of ideal throughput": by["adaptive"]["ratio"] >= 0.85,
        "least_connections >= 0.85 of ideal throughput": by["least_connections"]["ratio"] >= 0.85,
    }
    table(f"capacity: capacities {caps} (= weights), 50 ms, {sum(caps)} threads, ideal {ideal:.0f} req/s",
          rows,
          extra="of_ideal")
    return {"rows": rows, "checks": checks}


def scenario_failover(n: int) -> Dict[str, Any]:
    spec = [{"id": f"n{i}", "latency_ms": 40, "p99_latency_ms": 120} for i in range(4)]
    rows = []
    with GatewayProcess(spec) as gw:
        for s in ("round_robin", "least_connections", "adaptive"):
            gw.configure("n1", fault=None)
            gw.configure("n2", fault=None)
            timeline = [(3.0, lambda: gw.configure("n1", fault="refuse")),
                        (6.0, lambda: gw.configure("n2", fault="hang", hang_s=30)),
                        (10.0, lambda: None)]
            result = drive(gw, gw.client_nodes, s, n, 32, strategy=s, timeline=timeline)
            gw.configure("n2", fault=None)  # release hung requests before the next run
            r = result.summary()
            per_second = [result.per_second[k] for k in range(10)]
            normal = statistics.median(per_second[:3])
            worst = min(per_second)
            r["worst_second"] = f"worst second {worst / normal:.0%} of normal" if normal else "n/a"
            r["worst_ratio"] = (worst / normal) if normal else 0.0
            r["per_second"] = per_second
            rows.append(r)
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive: 0 caller errors": by["adaptive"]["error_rate"] == 0,
        "adaptive: no second below 60% of normal throughput": by["adaptive"]["worst_ratio"] >= 0.6,
    }
    table("failover: 10 s; n1 refuses connections from 3 s, n2 hangs from 6 s (read timeout 2 s)",
          rows, extra="worst_second")
    for r in rows:
        print(f"  {r['label']}: calls per second {r['per_second']}")
    return {"rows": rows, "checks": checks}


SCENARIOS = {"regions": scenario_regions, "capacity": scenario_capacity, "failover": scenario_failover}


def main() -> int:
    ap = argparse.ArgumentParser(description="Routing strategies side by side on the simulated gateway")
    ap.add_argument("--requests", type=int, default=2000, help="measured calls per configuration")
    ap.add_argument("--scenario", default="regions,capacity,failover")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--adaptive", metavar="K=V,...", default="",
                    help="Adaptive() options to try, e.g. load_bias=0.5,latency_band=2")
    args = ap.parse_args()
    for item in filter(None, args.adaptive.split(",")):
        key, value = item.split("=")
        ADAPTIVE_OPTIONS[key] = float(value)
    results = {}
    all_ok = True
    for name in args.scenario.split(","):
        results[name] = SCENARIOS[name](args.requests)
        for check, ok in results[name]["checks"].items():
            all_ok &= bool(ok)
            print(f"  [{'met' if ok else 'NOT met'}] {check}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    extra = f" --adaptive {args.adaptive}" if args.adaptive else ""
    print(f"\nreproduce: python benchmarks/strategies.py --requests {args.requests} --scenario {args.scenario}{extra}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
