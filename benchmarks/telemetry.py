"""What telemetry costs: per call with an exporter attached vs none, and per scrape.

Each row of CONFIGURATIONS attaches one kind of telemetry to its own Client (4 nodes
of a simulated gateway at 0 ms, served from a separate process). Per-call cost: the
rows' clients are driven in interleaved rounds at 1 and 8 threads; the table shows
median calls/s, the process's time per call (1 / throughput), the CPU time this
process spent per call (the gateway's is not counted), and their differences from the
"none" row: the per-call cost of that telemetry (noise is some µs either way; the CPU
column is the steadier one on a busy machine). The "scraped every 0.1 s" row's CPU
includes the scrapes themselves, spread over the calls.
Scrape cost: one client with 4 nodes and 10 models, every node, model, breaker and
spend row populated; the median time of one scrape and the size of the exposition,
per row that can be scraped.

The Prometheus collector reads the client's state only when scraped, so its per-call
cost should be nil; the "scraped every 0.1 s" row shows that scrapes running beside
the calls do not slow them either (locks are held for microseconds, no lock during I/O).

To add a kind of telemetry, append a ``Telemetry`` row: ``attach(client)`` wires it up
and returns a scrape function (or None when there is nothing to scrape).

    python benchmarks/telemetry.py [--seconds 1] [--rounds 5] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _simproc import GatewayProcess  # noqa: E402
from holysheep_lb import Client  # noqa: E402

MSGS = [{"role": "user", "content": "hello"}]
NODES = [{"id": f"node-{i}", "region": f"region-{i}", "latency_ms": 0} for i in range(4)]
MODELS = [f"model-{i}" for i in range(10)]
PRICES = {m: {"input": 1.0 + i, "output": 2.0 + i} for i, m in enumerate(MODELS)}

Scrape = Callable[[], bytes]


@dataclass(frozen=True)
class Telemetry:
    """One row: how to attach this telemetry to a client; ``scrape_every_s`` scrapes it
    from a background thread while calls are measured."""

    name: str
    attach: Callable[[Client], Optional[Scrape]]
    scrape_every_s: Optional[float] = None


def _none(client: Client) -> Optional[Scrape]:
    return None


def _prometheus(client: Client) -> Optional[Scrape]:
    from prometheus_client import CollectorRegistry, generate_latest

    from holysheep_lb.contrib.prometheus import HolySheepCollector

    registry = CollectorRegistry()
    registry.register(HolySheepCollector(client))
    return lambda: generate_latest(registry)


CONFIGURATIONS: List[Telemetry] = [
    Telemetry("none", _none),
    Telemetry("prometheus collector", _prometheus),
    Telemetry("prometheus, scraped every 0.1 s", _prometheus, scrape_every_s=0.1),
]


def measure(call: Callable[[], Any], threads: int, seconds: float) -> Tuple[float, float]:
    """Calls per second of ``call`` from ``threads`` threads for about ``seconds``, and this
    process's CPU time per call in µs (the gateway runs in another process)."""
    stop = threading.Event()
    counts = [0] * threads

    def worker(k: int) -> None:
        n = 0
        while not stop.is_set():
            call()
            n += 1
        counts[k] = n

    with ThreadPoolExecutor(threads) as pool:
        cpu0 = time.process_time()
        futures = [pool.submit(worker, k) for k in range(threads)]
        t0 = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    calls = sum(counts)
    return calls / elapsed, cpu * 1e6 / max(1, calls)


class _Scraper:
    """Scrapes every ``interval_s`` on a thread while a measurement runs (bounded by stop())."""

    def __init__(self, scrape: Scrape, interval_s: float) -> None:
        self._scrape = scrape
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.scrapes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._scrape()
            self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _client(gw: GatewayProcess) -> Client:
    return Client(api_key="sk-benchmark", nodes=gw.client_nodes, health_check_interval_s=None,
                  prices=PRICES, pool_maxsize=32)


def per_call(gw: GatewayProcess, seconds: float, rounds: int) -> bool:
    clients: Dict[str, Client] = {}
    scrapes: Dict[str, Optional[Scrape]] = {}
    for row in CONFIGURATIONS:
        clients[row.name] = _client(gw)
        scrapes[row.name] = row.attach(clients[row.name])
    calls = {name: (lambda c=c: c.chat_completion(MSGS, model="model-0")) for name, c in clients.items()}
    for call in calls.values():
        for _ in range(20):
            call()  # warm the pools and the first latency samples
    print(f"\nPer call ({len(NODES)} nodes at 0 ms, medians of {rounds} interleaved rounds of {seconds:g} s)")
    print(f"{'telemetry':<34} {'threads':>7} {'calls/s':>9} {'µs/call':>8} {'vs none':>8} {'CPU µs/call':>12} "
          f"{'vs none':>8}")
    for threads in (1, 8):
        rates: Dict[str, List[float]] = {row.name: [] for row in CONFIGURATIONS}
        cpus: Dict[str, List[float]] = {row.name: [] for row in CONFIGURATIONS}
        for _ in range(rounds):
            for row in CONFIGURATIONS:
                scrape = scrapes[row.name]
                scraper = _Scraper(scrape, row.scrape_every_s) if scrape and row.scrape_every_s else None
                try:
                    rate, cpu_us = measure(calls[row.name], threads, seconds)
                finally:
                    if scraper is not None:
                        scraper.stop()
                rates[row.name].append(rate)
                cpus[row.name].append(cpu_us)
        base_us = 1e6 / statistics.median(rates["none"])
        base_cpu = statistics.median(cpus["none"])
        for row in CONFIGURATIONS:
            rate = statistics.median(rates[row.name])
            us = 1e6 / rate
            cpu_us = statistics.median(cpus[row.name])
            print(f"{row.name:<34} {threads:>7} {rate:>9.0f} {us:>8.1f} {us - base_us:>+8.1f} {cpu_us:>12.1f} "
                  f"{cpu_us - base_cpu:>+8.1f}")
    ok = True
    for client in clients.values():
        stats = client.stats()
        ok &= stats["failures"] == 0 and stats["in_flight"] == 0
        client.close()
    return ok


def per_scrape(gw: GatewayProcess, scrapes: int) -> None:
    print(f"\nPer scrape ({len(NODES)} nodes, {len(MODELS)} models, every breaker and spend row populated, "
          f"median of {scrapes})")
    print(f"{'telemetry':<34} {'ms/scrape':>9} {'bytes':>8} {'series':>7}")
    for row in CONFIGURATIONS:
        if row.scrape_every_s is not None:
            continue  # the same exporter as another row
        client = _client(gw)
        scrape = row.attach(client)
        if scrape is None:
            client.close()
            continue
        for i in range(200):
            client.chat_completion(MSGS, model=MODELS[i % len(MODELS)])
        times = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            text = scrape()
            times.append(time.perf_counter() - t0)
        series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
        print(f"{row.name:<34} {statistics.median(times) * 1000:>9.2f} {len(text):>8} {series:>7}")
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per thread count")
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes timed per row")
    args = ap.parse_args()
    with GatewayProcess(NODES) as gw:
        ok = per_call(gw, args.seconds, args.rounds)
        per_scrape(gw, args.scrapes)
    print(f"\nreproduce: python benchmarks/telemetry.py --seconds {args.seconds:g} --rounds {args.rounds} "
          f"--scrapes {args.scrapes}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
