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

The OpenTelemetry rows (``holysheep_lb.contrib.otel``) do work on the call path: a span
per call and per attempt and a few histogram and counter updates. "otel on (SDK,
in-memory exporter)" is the real SDK with a SimpleSpanProcessor exporting every span
into memory as it ends (cleared between measurements) and an in-memory metric reader;
"otel, API only (no-op providers)" is the observer alone, with the API's no-op tracer
and meter (what an installed but unconfigured OpenTelemetry costs). Both need a Client
that fires call events (``client.add_observer``); the output says when it fires none,
and then those rows measure nothing.

To add a kind of telemetry, append a ``Telemetry`` row: ``attach(client)`` wires it up
and returns a scrape function (or None when there is nothing to scrape).

The last table feeds one call's events straight to the OpenTelemetry observer (no client,
no network): its cost per call wherever the client fires the events.

    python benchmarks/telemetry.py [--seconds 1] [--rounds 5] [--scrapes 200] [--observer-calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import weakref
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
    between_rounds: Optional[Callable[[Client], None]] = None


def _none(client: Client) -> Optional[Scrape]:
    return None


def _prometheus(client: Client) -> Optional[Scrape]:
    from prometheus_client import CollectorRegistry, generate_latest

    from holysheep_lb.contrib.prometheus import HolySheepCollector

    registry = CollectorRegistry()
    registry.register(HolySheepCollector(client))
    return lambda: generate_latest(registry)


class _OTelPipeline:
    """An instrumented client's in-memory SDK pipeline (None parts for the no-op providers)."""

    def __init__(self, exporter: Any, reader: Any) -> None:
        self.exporter = exporter
        self.reader = reader
        self.calls_seen = 0
        self.error: Optional[str] = None


_OTEL: "weakref.WeakKeyDictionary[Client, _OTelPipeline]" = weakref.WeakKeyDictionary()


def _instrument(client: Client, tracer_provider: Any, meter_provider: Any, pipeline: _OTelPipeline) -> None:
    from holysheep_lb.contrib.otel import instrument

    _OTEL[client] = pipeline
    try:
        instrument(client, tracer_provider, meter_provider)
    except TypeError as exc:  # a Client that takes no observers yet
        pipeline.error = str(exc)


def _otel_sdk(client: Client) -> Optional[Scrape]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    _instrument(client, tracer_provider, MeterProvider(metric_readers=[reader]), _OTelPipeline(exporter, reader))
    return None  # OpenTelemetry pushes through its exporters: nothing to scrape here


def _otel_noop(client: Client) -> Optional[Scrape]:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    _instrument(client, NoOpTracerProvider(), NoOpMeterProvider(), _OTelPipeline(None, None))
    return None


def _otel_between_rounds(client: Client) -> None:
    """Count the calls the exporter saw, then empty it (memory stays bounded)."""
    pipeline = _OTEL.get(client)
    if pipeline is not None and pipeline.exporter is not None:
        spans = pipeline.exporter.get_finished_spans()
        pipeline.calls_seen += sum(1 for span in spans if span.parent is None)
        pipeline.exporter.clear()


CONFIGURATIONS: List[Telemetry] = [
    Telemetry("none", _none),
    Telemetry("prometheus collector", _prometheus),
    Telemetry("prometheus, scraped every 0.1 s", _prometheus, scrape_every_s=0.1),
    Telemetry("otel on (SDK, in-memory exporter)", _otel_sdk, between_rounds=_otel_between_rounds),
    Telemetry("otel, API only (no-op providers)", _otel_noop),
]


def _events_note(clients: Dict[str, Client]) -> List[str]:
    """Lines that say whether the OpenTelemetry rows measured anything."""
    notes = []
    for name, client in clients.items():
        pipeline = _OTEL.get(client)
        if pipeline is None:
            continue
        if pipeline.error is not None:
            notes.append(f"NOTE {name}: not instrumented ({pipeline.error}); this row is a plain client, "
                         "not meaningful")
        elif pipeline.exporter is not None and pipeline.calls_seen == 0:
            notes.append(f"NOTE {name}: the client fired no call events (observers are not wired into the "
                         "Client yet): the otel rows measure an observer that is never called, not meaningful")
        elif pipeline.exporter is not None:
            notes.append(f"{name}: {pipeline.calls_seen} call spans exported")
    return notes


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
    print(f"{'telemetry':<34} {'threads':>7} {'calls/s':>9} {'µs/call':>8} {'vs none':>8} {'ratio':>6} "
          f"{'CPU µs/call':>12} {'vs none':>8} {'ratio':>6}")
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
                if row.between_rounds is not None:
                    row.between_rounds(clients[row.name])
        base_us = 1e6 / statistics.median(rates["none"])
        base_cpu = statistics.median(cpus["none"])
        for row in CONFIGURATIONS:
            rate = statistics.median(rates[row.name])
            us = 1e6 / rate
            cpu_us = statistics.median(cpus[row.name])
            print(f"{row.name:<34} {threads:>7} {rate:>9.0f} {us:>8.1f} {us - base_us:>+8.1f} {us / base_us:>6.2f} "
                  f"{cpu_us:>12.1f} {cpu_us - base_cpu:>+8.1f} {cpu_us / base_cpu:>6.2f}")
    for row in CONFIGURATIONS:
        if row.between_rounds is not None:
            row.between_rounds(clients[row.name])  # the warm-up and the last round
    for line in _events_note(clients):
        print(line)
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


def per_observer_call(calls: int) -> None:
    """The OpenTelemetry observer alone: one call's events (start, one attempt, end) fed
    straight to it, no client and no network; what each call costs wherever it is wired."""
    try:
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.trace import NoOpTracerProvider

        from holysheep_lb.contrib.otel import OTelObserver
        from holysheep_lb.observe import AttemptEvent, CallEnd, CallInfo
    except ImportError as exc:
        print(f"\nObserver alone: skipped ({exc})")
        return
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    observers = {"otel on (SDK, in-memory exporter)": OTelObserver(
                     tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])),
                 "otel, API only (no-op providers)": OTelObserver(NoOpTracerProvider(), NoOpMeterProvider())}
    attempt = AttemptEvent(node_id="node-0", base_url="http://127.0.0.1:8101/v1", model="model-0", outcome="ok",
                           latency_s=0.01, status_code=200)
    end = CallEnd(node_id="node-0", base_url="http://127.0.0.1:8101/v1", response_model="model-0",
                  response_id="chatcmpl-1", finish_reasons=("stop",), input_tokens=12, output_tokens=30,
                  ended_at=1.02)
    print(f"\nObserver alone (events of one call with one attempt fed directly, median of 5 x {calls} calls)")
    print(f"{'telemetry':<34} {'µs/call':>8}")
    for name, observer in observers.items():
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                call = CallInfo(operation="chat", model="model-0", params={"max_tokens": 64}, messages=MSGS,
                                started_at=1.0)
                observer.call_started(call)
                observer.attempt_ended(call, attempt)
                observer.call_ended(call, end)
            runs.append((time.perf_counter() - t0) * 1e6 / calls)
            exporter.clear()
        print(f"{name:<34} {statistics.median(runs):>8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per thread count")
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes timed per row")
    ap.add_argument("--observer-calls", type=int, default=2000, help="calls fed to the observer alone, per run")
    args = ap.parse_args()
    with GatewayProcess(NODES) as gw:
        ok = per_call(gw, args.seconds, args.rounds)
        per_scrape(gw, args.scrapes)
    per_observer_call(args.observer_calls)
    print(f"\nreproduce: python benchmarks/telemetry.py --seconds {args.seconds:g} --rounds {args.rounds} "
          f"--scrapes {args.scrapes} --observer-calls {args.observer_calls}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
