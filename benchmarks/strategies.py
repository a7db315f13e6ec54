"""Routing strategies side by side on the simulated gateway.

    python benchmarks/strategies.py [--requests 2000] [--quick]
        [--scenario regions,capacity,failover,hang,quotas]

regions   the article's 4 regional nodes (ap-northeast: heavy tail, 2.3% 5xx), 32 threads.
          Targets: adaptive p99 <= 1.15 x fastest-node-only p99 and <= 0.5 x round_robin
          p99; caller error rate 0.
capacity  capacities 4, 4, 8, 16, 32 threads (= total capacity), ideal = 32 / latency;
          each row a fresh client, 5 s of learning then 5 s steady, throughput over
          whole seconds (both windows printed; targets on the steady one). Three tables:
          each node's weight set to its capacity as an operator would (50 ms); no
          weights at 50 ms; no weights at 200 ms. Targets: adaptive >= 0.97 of ideal
          with weights and >= 0.95 without; least_connections >= 0.85 with weights. An
          "oracle" row (threads pinned per node, as many as its capacity) shows what
          this machine reaches with perfect routing (every call's client and gateway
          time leaves a slot idle: 32 threads for 32 slots), so the same targets are
          also checked as >= 0.97 of the oracle.
failover  4 equal nodes for 10 s; one refuses connections from 3 s, another hangs
          from 6 s. Target: 0 caller errors; no second below 60% of normal throughput
          (seconds from the second one, as in hang).
hang      4 equal nodes, 16 threads, client defaults but read_timeout_s=5; one node
          accepts and never answers for 10 s, starting under load (the simulator's
          hang_after_requests, set so that it starts ~5 s in). Targets for adaptive:
          0 caller errors, no second below 90% of the median second. Also printed: calls
          that took over 10x the nodes' latency (those held by the hung node) and the slowest.
          Seconds are counted from the run's second second: the first is short by one
          latency of answers (a closed loop's first answers come one latency after it
          starts), which is not the hang's doing.
quotas    4 nodes with 600, 600, 1200 and 2400 requests per minute, equal weights,
          driven open-loop at 75% of the sum (60 calls/s) for 20 s, from spent quotas
          (a full minute's burst would hide the sustained rates), spent before the
          client's warm-up (a quota spent behind a client's back after its last reading
          costs any client one 429 per node: only an answer tells). Targets for
          adaptive: 0 429s sent by the gateway during the run, 0 caller errors. Printed
          beside: round_robin (the quota rules are the selector's, so it keeps them too)
          and round_robin with the headers ignored (what reading them saves), and the
          429s sent after the run's first second.

``--quick`` shortens every run for a smoke test (the numbers then mean little).
The gateway runs in a child process so its CPU use does not skew our latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _loadtools import PacedResult, full_seconds, run_paced, spend_quotas, worst_second_ratio  # noqa: E402
from _simproc import GatewayProcess  # noqa: E402
from holysheep_lb import Client  # noqa: E402
from holysheep_lb.loadgen import LoadResult, run_load, seed_regions  # noqa: E402
from holysheep_lb.nodes import NodeState  # noqa: E402
from holysheep_lb.selection import Adaptive  # noqa: E402

ADAPTIVE_OPTIONS: Dict[str, float] = {}


def strategy_for(name: str) -> Any:
    return Adaptive(**ADAPTIVE_OPTIONS) if name == "adaptive" and ADAPTIVE_OPTIONS else name

MSGS = [{"role": "user", "content": "benchmark"}]
STRATEGIES = ["round_robin", "weighted", "least_connections", "geographic", "adaptive"]
COMPARED = ["round_robin", "least_connections", "adaptive"]
Runner = Callable[[Callable[[int], Any], str], LoadResult]


def drive(gw: GatewayProcess, nodes: List[Dict[str, Any]], label: str, requests: int,
          concurrency: int, timeline: Optional[List[Tuple[float, Callable[[], Any]]]] = None, *,
          before_run: Optional[Callable[[], Any]] = None, stop: Optional[threading.Event] = None,
          runner: Optional[Runner] = None, **client_kw: Any) -> LoadResult:
    """Warm up, then run ``requests`` calls on ``concurrency`` threads.

    ``timeline`` is [(at_s, action)], and when given the run stops at its last entry
    instead (a time-based run); so it does when ``stop`` is set (by whoever holds it).
    ``before_run`` runs between the warm-up and the measured run; ``runner(call, label)``
    replaces the closed loop (e.g. an open-loop generator)."""
    client_kw.setdefault("health_check_interval_s", 1.0)
    client_kw.setdefault("read_timeout_s", 2.0)
    if "strategy" in client_kw:
        client_kw["strategy"] = strategy_for(client_kw["strategy"])
    client = Client(nodes=nodes, **client_kw)
    try:
        def call(i: int) -> Any:
            return client.chat_completion(MSGS, model="gpt-4.1")

        # warm-up: connections and first latency samples, not measured
        run_load(call, requests=concurrency * 2, concurrency=concurrency)
        if before_run is not None:
            before_run()
        time_based = bool(timeline) or stop is not None
        stop = stop or threading.Event()
        timers = []
        for at_s, action in timeline or []:
            timer = threading.Timer(at_s, action)
            timer.daemon = True
            timers.append(timer)
        if timeline:
            timers.append(threading.Timer(timeline[-1][0], stop.set))
        if time_based:
            requests = 10 ** 7
        for timer in timers:
            timer.start()
        if runner is not None:
            result = runner(call, label)
        else:
            result = run_load(call, requests=requests, concurrency=concurrency, label=label, stop=stop)
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


def scenario_regions(n: int, quick: bool = False) -> Dict[str, Any]:
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
        "adaptive p99 <= 1.15 x fastest-node p99":
            by["adaptive"]["p99_ms"] <= 1.15 * by["fastest node only (oracle)"]["p99_ms"],
        "adaptive p99 <= 0.5 x round_robin p99": by["adaptive"]["p99_ms"] <= 0.5 * by["round_robin"]["p99_ms"],
        "adaptive caller error rate == 0": by["adaptive"]["error_rate"] == 0,
    }
    table("regions: the article's 4 nodes, 32 threads", rows)
    return {"rows": rows, "checks": checks}


# -- capacity -----------------------------------------------------------------------

CAPACITIES = [4, 4, 8, 16]


def oracle_run(nodes: List[Dict[str, Any]], duration_s: float) -> LoadResult:
    """Perfect routing, for reference: each node gets threads of its own, as many as its
    capacity (one single-node client each). What this machine reaches when no strategy
    is in the way; the per-call overhead keeps it somewhat below the ideal."""
    clients = [Client(nodes=[nd], health_check_interval_s=1.0, read_timeout_s=2.0) for nd in nodes]
    stop = threading.Event()
    try:
        calls = [lambda i, c=c: c.chat_completion(MSGS, model="gpt-4.1") for c in clients]
        for call, cap in zip(calls, CAPACITIES):
            run_load(call, requests=cap * 2, concurrency=cap)
        timer = threading.Timer(duration_s, stop.set)
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            futures = [pool.submit(run_load, call, requests=10 ** 7, concurrency=cap, stop=stop)
                       for call, cap in zip(calls, CAPACITIES)]
            timer.start()
            parts = [f.result() for f in futures]
        timer.cancel()
    finally:
        for c in clients:
            c.close()
    merged = LoadResult(label="oracle (threads = capacity)")
    for part in parts:  # started within a few ms of each other: their seconds line up
        merged.calls += part.calls
        merged.errors.update(part.errors)
        merged.latencies_ms.extend(part.latencies_ms)
        merged.node_share.update(part.node_share)
        merged.per_second.update(part.per_second)
        merged.wall_s = max(merged.wall_s, part.wall_s)
    return merged


@dataclass(frozen=True)
class CapacityTiming:
    """Each row runs ``learn_s`` (a fresh client learning the nodes) then ``steady_s``;
    throughput is reported for both windows, over whole seconds."""

    learn_s: int
    steady_s: int


CAPACITY_FULL = CapacityTiming(learn_s=5, steady_s=5)
CAPACITY_QUICK = CapacityTiming(learn_s=1, steady_s=1)


def capacity_table(latency_ms: float, weights: bool, strategies: List[str], t: CapacityTiming) -> List[Dict[str, Any]]:
    """One time-boxed run per strategy on nodes of CAPACITIES at ``latency_ms``."""
    # ids without "-": the table abbreviates an id to what comes before its first "-"
    spec = [{"id": f"cap{c}{'abcd'[i]}", "latency_ms": latency_ms, "capacity": c} for i, c in enumerate(CAPACITIES)]
    threads = sum(CAPACITIES)
    ideal = threads / (latency_ms / 1000.0)
    kind = f"{'weights = capacities' if weights else 'no weights'}, {latency_ms:g} ms"
    duration_s = t.learn_s + t.steady_s
    rows = []
    with GatewayProcess(spec) as gw:
        # Operators declare a node's capacity as its weight (as with nginx upstreams).
        nodes = [dict(nd, weight=c) for nd, c in zip(gw.client_nodes, CAPACITIES)] if weights else gw.client_nodes
        # each run a little past the last whole second, so that second is complete
        end = [(duration_s + 0.05, lambda: None)]
        runs = [partial(oracle_run, gw.client_nodes, duration_s + 0.05)]
        runs += [partial(drive, gw, nodes, s, 0, threads, end, strategy=s) for s in strategies]
        oracle_rps = 0.0
        for run in runs:
            result = run()
            r = result.summary()
            seconds = full_seconds(result, duration_s)
            learning = sum(seconds[:t.learn_s]) / t.learn_s
            steady = sum(seconds[t.learn_s:]) / t.steady_s
            oracle_rps = oracle_rps or steady  # the oracle runs first
            r.update(table=kind, per_second=seconds, learning_rps=round(learning, 1), steady_rps=round(steady, 1),
                     learning_ratio=learning / ideal, ratio=steady / ideal, of_oracle=steady / oracle_rps,
                     cell=f"first {t.learn_s} s {learning / ideal:.2f}, then {steady:.0f} = {steady / ideal:.2f} "
                          f"of ideal, {steady / oracle_rps:.2f} of oracle")
            rows.append(r)
    table(f"capacity: capacities {CAPACITIES}, {kind}, {threads} threads, ideal {ideal:.0f} req/s, "
          f"{t.learn_s} s learning then {t.steady_s} s steady per row (a fresh client each)", rows, extra="cell")
    return rows


def scenario_capacity(n: int, quick: bool = False) -> Dict[str, Any]:
    t = CAPACITY_QUICK if quick else CAPACITY_FULL
    # geographic (all nodes in one region) only in full runs: it keeps --quick short
    weighted = capacity_table(50, True, ["round_robin", "weighted", "least_connections", "adaptive"]
                              if quick else STRATEGIES, t)
    plain_50 = capacity_table(50, False, COMPARED, t)
    plain_200 = capacity_table(200, False, COMPARED, t)

    def row(rows: List[Dict[str, Any]], label: str) -> Dict[str, Any]:
        return next(r for r in rows if r["label"] == label)

    checks = {
        "adaptive >= 0.97 of ideal with weights = capacities (50 ms)": row(weighted, "adaptive")["ratio"] >= 0.97,
        "least_connections >= 0.85 of ideal with weights = capacities (50 ms)":
            row(weighted, "least_connections")["ratio"] >= 0.85,
        "adaptive >= 0.95 of ideal without weights (50 ms)": row(plain_50, "adaptive")["ratio"] >= 0.95,
        "adaptive >= 0.95 of ideal without weights (200 ms)": row(plain_200, "adaptive")["ratio"] >= 0.95,
    }
    # What no router can beat here: the same targets against the oracle's steady rate.
    for rows, what in ((weighted, "with weights (50 ms)"), (plain_50, "without weights (50 ms)"),
                       (plain_200, "without weights (200 ms)")):
        checks[f"adaptive >= 0.97 of the oracle {what}"] = row(rows, "adaptive")["of_oracle"] >= 0.97
    return {"rows": weighted + plain_50 + plain_200, "checks": checks}


# -- failover -----------------------------------------------------------------------


def scenario_failover(n: int, quick: bool = False) -> Dict[str, Any]:
    scale = 0.4 if quick else 1.0
    refuse_at_s, hang_at_s, end_s = 3.0 * scale, 6.0 * scale, 10.0 * scale
    spec = [{"id": f"n{i}", "latency_ms": 40, "p99_latency_ms": 120} for i in range(4)]
    rows = []
    with GatewayProcess(spec) as gw:
        for s in COMPARED:
            gw.configure("n1", fault=None)
            gw.configure("n2", fault=None)
            timeline = [(refuse_at_s, lambda: gw.configure("n1", fault="refuse")),
                        (hang_at_s, lambda: gw.configure("n2", fault="hang", hang_s=30)),
                        (end_s, lambda: None)]
            result = drive(gw, gw.client_nodes, s, n, 32, strategy=s, timeline=timeline)
            gw.configure("n2", fault=None)  # release hung requests before the next run
            r = result.summary()
            per_second = full_seconds(result, end_s)
            # second 0 is left out, as in scenario_hang: it is short by a latency of answers
            normal = statistics.median(per_second[1:max(2, int(refuse_at_s))])
            worst = min(per_second[1:])
            r["worst_second"] = f"worst second {worst / normal:.0%} of normal" if normal else "n/a"
            r["worst_ratio"] = (worst / normal) if normal else 0.0
            r["per_second"] = per_second
            rows.append(r)
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive: 0 caller errors": by["adaptive"]["error_rate"] == 0,
        "adaptive: no second below 60% of normal throughput": by["adaptive"]["worst_ratio"] >= 0.6,
    }
    table(f"failover: {end_s:g} s; n1 refuses connections from {refuse_at_s:g} s, n2 hangs from "
          f"{hang_at_s:g} s (read timeout 2 s)", rows, extra="worst_second")
    for r in rows:
        print(f"  {r['label']}: calls per second {r['per_second']}")
    return {"rows": rows, "checks": checks}


# -- hang under load ----------------------------------------------------------------


@dataclass(frozen=True)
class HangTiming:
    """When the node hangs: after about ``before_s`` of load, for ``hang_s``; the run
    ends ``after_s`` after the node answers again."""

    read_timeout_s: float
    before_s: float
    hang_s: float
    after_s: float


HANG_FULL = HangTiming(read_timeout_s=5.0, before_s=5.0, hang_s=10.0, after_s=5.0)
HANG_QUICK = HangTiming(read_timeout_s=0.5, before_s=1.0, hang_s=1.0, after_s=1.0)


class HangWindow:
    """Makes ``node_id`` hang once under load: it answers ``after_requests`` requests,
    then accepts and holds every request until ``hang_s`` after the first one held;
    the run's ``stop`` is set ``after_s`` after that. A background thread watches the
    gateway's count (it is not known in advance when the count is reached)."""

    def __init__(self, gw: GatewayProcess, node_id: str, after_requests: int, timing: HangTiming) -> None:
        self.gw, self.node_id, self.after_requests, self.timing = gw, node_id, after_requests, timing
        self.stop = threading.Event()
        self.hang_from_s: Optional[float] = None
        self.end_s = 0.0
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def arm(self) -> None:
        self.gw.reset_counts()  # the count from here is the node's count towards the hang
        self.gw.configure(self.node_id, hang_after_requests=self.after_requests, hang_s=self.timing.hang_s)
        self._thread = threading.Thread(target=self._watch, args=(time.perf_counter(),), daemon=True)
        self._thread.start()

    def _watch(self, started: float) -> None:
        t = self.timing
        give_up_at = started + 4 * t.before_s  # a strategy that starves the node never triggers it
        try:
            while time.perf_counter() < give_up_at and not self.stop.is_set():
                if self.gw.counts()[self.node_id] > self.after_requests:
                    self.hang_from_s = time.perf_counter() - started
                    self.stop.wait(t.hang_s)
                    break
                self.stop.wait(0.02)
            self.gw.configure(self.node_id, hang_after_requests=None)  # answers again, releases held requests
            self.stop.wait(t.after_s)
            self.end_s = time.perf_counter() - started
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self._error = exc
        finally:
            self.stop.set()

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._error is not None:
            raise self._error


def scenario_hang(n: int, quick: bool = False) -> Dict[str, Any]:
    t = HANG_QUICK if quick else HANG_FULL
    latency_ms, threads = 50, 16
    spec = [{"id": f"n{i}", "latency_ms": latency_ms, "p99_latency_ms": 120} for i in range(4)]
    # the node's share of ~threads/latency calls per second, for before_s
    after_requests = int(threads / (latency_ms / 1000.0) / len(spec) * t.before_s)
    rows = []
    with GatewayProcess(spec) as gw:
        for s in COMPARED:
            window = HangWindow(gw, "n2", after_requests, t)
            # client defaults (health probes every 10 s, ...) but the read timeout
            result = drive(gw, gw.client_nodes, s, n, threads, before_run=window.arm, stop=window.stop,
                           strategy=s, read_timeout_s=t.read_timeout_s, health_check_interval_s=10.0)
            window.finish()
            r = result.summary()
            per_second = full_seconds(result, window.end_s)
            # second 0 is left out: a closed loop's first answers arrive one latency after
            # it starts, so that second is always short by about a latency's worth
            ratio = worst_second_ratio(per_second[1:])
            hang = ("never" if window.hang_from_s is None
                    else f"{window.hang_from_s:.1f}-{window.hang_from_s + t.hang_s:.1f} s")
            # calls held far past the nodes' latency: those that sat on the hung node
            stuck = sum(1 for ms in result.latencies_ms if ms > 10 * latency_ms)
            slowest_ms = max(result.latencies_ms, default=0.0)
            r.update(per_second=per_second, worst_ratio=ratio, caller_errors=sum(r["errors"].values()),
                     hang_window=hang, stuck_calls=stuck, slowest_ms=round(slowest_ms, 1),
                     worst_second=f"worst second {ratio:.0%} of median; {sum(r['errors'].values())} errors; "
                                  f"hang {hang}; {stuck} calls > {10 * latency_ms} ms, slowest {slowest_ms:.0f} ms")
            rows.append(r)
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive: 0 caller errors": by["adaptive"]["caller_errors"] == 0,
        "adaptive: no second below 90% of the median throughput": by["adaptive"]["worst_ratio"] >= 0.9,
    }
    table(f"hang: 4 x {latency_ms} ms nodes, {threads} threads, read_timeout_s={t.read_timeout_s:g}; n2 hangs "
          f"for {t.hang_s:g} s after {after_requests} requests", rows, extra="worst_second")
    for r in rows:
        print(f"  {r['label']}: calls per second {r['per_second']}")
    return {"rows": rows, "checks": checks}


# -- quotas -------------------------------------------------------------------------

QUOTAS_RPM = [600, 600, 1200, 2400]


def quota_row(gw: GatewayProcess, spec: List[Dict[str, Any]], strategy: str, rate_per_s: float,
              duration_s: float, *, read_headers: bool = True) -> Dict[str, Any]:
    """One open-loop run from spent quotas; the gateway's 429s by node and the callers' errors.
    ``read_headers=False``: the client ignores the x-ratelimit-* headers (a baseline
    showing what reading them saves)."""
    paced: List[PacedResult] = []
    if not read_headers:
        saved = NodeState.observe_quota
        NodeState.observe_quota = lambda self, headers, now: None  # type: ignore[method-assign]
        try:
            row = quota_row(gw, spec, strategy, rate_per_s, duration_s)
        finally:
            NodeState.observe_quota = saved  # type: ignore[method-assign]
        row["label"] = f"{strategy}, quota headers ignored"
        return row

    def spend() -> None:
        for nd in spec:  # spent at full speed, or the first node refills while the last is spent
            gw.configure(nd["id"], latency_ms=0, p99_latency_ms=None)
        spend_quotas([nd["base_url"] for nd in gw.client_nodes])
        for nd in spec:
            gw.configure(nd["id"], latency_ms=nd["latency_ms"], p99_latency_ms=nd["p99_latency_ms"])

    # Spent before the client's warm-up: a client learns a quota only from an answer, so
    # one spent behind its back after its last reading must cost a 429 per node (any
    # client's first request there). The warm-up's own 429s are not counted.
    spend()

    early: List[int] = []  # 429s sent in the run's first second

    def open_loop(call: Callable[[int], Any], label: str) -> LoadResult:
        def count_early() -> None:
            early.append(sum(sum(gw.quota_stats(nd["id"]).values()) for nd in spec))

        timer = threading.Timer(1.0, count_early)
        timer.daemon = True
        timer.start()
        try:
            paced.append(run_paced(call, rate_per_s=rate_per_s, duration_s=duration_s, max_threads=64,
                                   label=label))
        finally:
            timer.cancel()
        return paced[0].load

    result = drive(gw, gw.client_nodes, strategy, 0, 16, before_run=gw.reset_counts, runner=open_loop,
                   strategy=strategy)
    refused = {nd["id"]: sum(gw.quota_stats(nd["id"]).values()) for nd in gw.client_nodes}
    r = result.summary()
    errors = sum(r["errors"].values())
    # 429s in the first second would be the client acting on its warm-up's readings
    # before its first answers of the run arrive.
    after_first_s = sum(refused.values()) - (early[0] if early else 0)
    r.update(server_429s=sum(refused.values()), server_429s_by_node=refused, caller_errors=errors,
             server_429s_after_first_s=after_first_s if early else None,
             offered=paced[0].offered, max_late_ms=paced[0].max_late_ms,
             quota_cell=f"429s sent {sum(refused.values())}: " + " ".join(f"{k}:{v}" for k, v in refused.items())
                        + f" ({after_first_s if early else '?'} after the first second); {errors} caller errors")
    return r


def scenario_quotas(n: int, quick: bool = False) -> Dict[str, Any]:
    rpm_scale, duration_s = (0.25, 2.0) if quick else (1.0, 20.0)
    quotas = [int(q * rpm_scale) for q in QUOTAS_RPM]
    spec = [{"id": f"q{i}", "latency_ms": 50, "p99_latency_ms": 120, "requests_per_minute": q}
            for i, q in enumerate(quotas)]
    rate_per_s = 0.75 * sum(quotas) / 60.0
    with GatewayProcess(spec) as gw:
        rows = [quota_row(gw, spec, "round_robin", rate_per_s, duration_s, read_headers=False)]
        rows += [quota_row(gw, spec, s, rate_per_s, duration_s) for s in ("round_robin", "adaptive")]
    by = {r["label"]: r for r in rows}
    checks = {
        "adaptive: 0 server-side 429s": by["adaptive"]["server_429s"] == 0,
        "adaptive: 0 caller errors": by["adaptive"]["caller_errors"] == 0,
    }
    share = " ".join(f"q{i}:{q / sum(quotas):.0%}" for i, q in enumerate(quotas))
    table(f"quotas: {quotas} requests/min, equal weights, open loop at {rate_per_s:g} calls/s "
          f"(75% of the sum) for {duration_s:g} s from spent quotas; quota share {share}", rows,
          extra="quota_cell")
    for r in rows:
        print(f"  {r['label']}: offered {r['offered']} calls, generator at most {r['max_late_ms']} ms late; "
              f"errors {r['errors']}")
    return {"rows": rows, "checks": checks}


SCENARIOS: Dict[str, Callable[[int, bool], Dict[str, Any]]] = {
    "regions": scenario_regions, "capacity": scenario_capacity, "failover": scenario_failover,
    "hang": scenario_hang, "quotas": scenario_quotas,
}


def main() -> int:
    ap = argparse.ArgumentParser(description="Routing strategies side by side on the simulated gateway")
    ap.add_argument("--requests", type=int, default=2000, help="measured calls per configuration (closed-loop runs)")
    ap.add_argument("--scenario", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true", help="short runs for a smoke test (numbers mean little)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--adaptive", metavar="K=V,...", default="",
                    help="Adaptive() options to try, e.g. load_bias=0.5,latency_band=2")
    args = ap.parse_args()
    names = [name for name in args.scenario.split(",") if name]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        ap.error(f"--scenario: unknown {unknown or args.scenario!r}; choose from {', '.join(SCENARIOS)}")
    for item in filter(None, args.adaptive.split(",")):
        key, value = item.split("=")
        ADAPTIVE_OPTIONS[key] = float(value)
    requests = min(args.requests, 200) if args.quick else args.requests
    flags = (" --quick" if args.quick else "") + (f" --adaptive {args.adaptive}" if args.adaptive else "")
    results = {}
    all_ok = True
    for name in names:
        results[name] = SCENARIOS[name](requests, args.quick)
        for check, ok in results[name]["checks"].items():
            all_ok &= bool(ok)
            print(f"  [{'met' if ok else 'NOT met'}] {check}")
        print(f"  reproduce: python benchmarks/strategies.py --requests {args.requests} --scenario {name}{flags}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    print(f"\nreproduce: python benchmarks/strategies.py --requests {args.requests} "
          f"--scenario {','.join(names)}{flags}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
