"""Real interrupts at random moments of hedged, fail-over and streaming calls: leaks and deadlocks.

Each run is a child process that makes calls on its main thread against a simulated
gateway on 127.0.0.1 (one node with 20% 5xx, hedging after 5 ms, node breakers, spend
reservations) while another thread sends it a signal every 0-30 ms; the signal handler
raises a ``BaseException`` (what Ctrl-C or a worker's soft time limit does) whenever
the main thread is inside a call. At the end of a run (after the hedge threads have
finished) every node slot, spend reservation, breaker trial and hedge thread must be
free. A run that makes no progress for ``--stall-s`` seconds is a deadlock: the child
dumps every thread's stack and exits.

    python benchmarks/interrupts.py [--runs 20] [--interrupts 50] [--seed 1] [--gap-ms 30]
                                    [--calls hedged:6,stream:3,dropped:1]

Prints one line per run and the totals. Not run by CI (about a minute).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any, Dict, List

# PYTHONPATH first, so that another copy of the package can be measured the same way
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb import Client, HolySheepError  # noqa: E402
from holysheep_lb.simulator import SimulatedGateway  # noqa: E402


class SoftTimeLimit(BaseException):
    """What a worker's soft time limit (or KeyboardInterrupt) raises."""


def _hedge_threads(client: Client) -> int:
    hedges = client.stats()["hedges"]
    if "threads_busy" in hedges:
        return int(hedges["threads_busy"])
    return sum(t.name.startswith("holysheep-hedge") for t in threading.enumerate())  # before threads_busy


def child(interrupts: int, seed: int, stall_s: float, gap_ms: float, kinds: List[str]) -> Dict[str, Any]:
    rng = random.Random(seed)
    nodes = [{"id": "a", "latency_ms": 20, "p99_latency_ms": 60, "error_rate": 0.2},
             {"id": "b", "latency_ms": 20, "p99_latency_ms": 60},
             {"id": "c", "latency_ms": 5, "chunk_delay_ms": 2}]
    in_call = [False]

    def on_signal(signum: int, frame: Any) -> None:
        if in_call[0]:
            raise SoftTimeLimit()

    signal.signal(signal.SIGUSR1, on_signal)
    done = threading.Event()
    main = threading.main_thread().ident

    def sender() -> None:
        while not done.wait(rng.uniform(0.0, gap_ms / 1000.0)):
            if in_call[0]:
                signal.pthread_kill(main, signal.SIGUSR1)  # type: ignore[arg-type]

    counts = {"interrupts": 0, "calls": 0, "errors": 0}
    with SimulatedGateway(nodes, seed=seed) as gw:
        client = Client(api_key="sk-bench", nodes=gw.client_nodes(), health_check_interval_s=None,
                        hedge_delay_s=0.005, hedge_max_ratio=1.0, retry_budget_ratio=None,
                        node_breakers={"fail_max": 1000}, breaker={"fail_max": 100000},
                        eject_after_failures=100000, strategy="round_robin", max_retries=2)
        messages = [{"role": "user", "content": "hello"}]
        threading.Thread(target=sender, daemon=True).start()
        last_progress = [time.monotonic()]

        def watchdog() -> None:
            while not done.wait(0.5):
                if time.monotonic() - last_progress[0] > stall_s:
                    sys.stderr.write(f"no progress for {stall_s:g} s: deadlock; stacks follow\n")
                    faulthandler.dump_traceback(all_threads=True)
                    os._exit(3)

        threading.Thread(target=watchdog, daemon=True).start()
        while counts["interrupts"] < interrupts:
            kind = rng.choice(kinds)
            try:
                try:
                    in_call[0] = True
                    if kind == "hedged":
                        client.chat_completion(messages, model="gpt-4.1", max_tokens=16)
                    else:
                        stream = client.chat_completion(messages, model="gpt-4.1", max_tokens=16, stream=True)
                        if kind == "stream":
                            stream.read_text()
                        else:
                            next(stream)
                            del stream
                finally:
                    in_call[0] = False
                counts["calls"] += 1
            except SoftTimeLimit:
                counts["interrupts"] += 1
            except HolySheepError:
                counts["errors"] += 1
            stream = None  # a stream interrupted while read is dropped here (the client's next call reaps it)
            last_progress[0] = time.monotonic()
        done.set()
        deadline = time.monotonic() + 10.0
        while _hedge_threads(client) and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        stats = client.stats()
        result = {
            **counts,
            "in_flight": stats["in_flight"],
            "awaiting": sum(n.awaiting for n in client.selector.nodes),
            "node_trials": sum(n.trial_in_flight for n in client.selector.nodes),
            "reserved_usd": str(client.ledger.store.reserved_usd()),
            "breaker_trials": sum(b["trials_in_flight"] for b in client.breakers()),
            "hedge_threads": _hedge_threads(client),
        }
        client.close()
    return result


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--interrupts", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall-s", type=float, default=20.0)
    parser.add_argument("--gap-ms", type=float, default=30.0, help="signals come every 0 to this many ms")
    parser.add_argument("--calls", default="hedged:6,stream:3,dropped:1",
                        help="the mix of calls: hedged, stream (read to the end), dropped (after one chunk)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kinds = [kind for part in args.calls.split(",") for kind in [part.split(":")[0]] * int(part.split(":")[1])]
        print(json.dumps(child(args.interrupts, args.seed, args.stall_s, args.gap_ms, kinds)))
        return 0
    totals = {"interrupts": 0, "calls": 0, "in_flight": 0, "reserved_usd": Decimal(0), "breaker_trials": 0,
              "hedge_threads": 0, "deadlocks": 0, "crashes": 0}
    for run in range(args.runs):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--interrupts", str(args.interrupts),
               "--seed", str(args.seed + run), "--stall-s", str(args.stall_s), "--gap-ms", str(args.gap_ms),
               "--calls", args.calls]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stall_s * 10)
        if proc.returncode == 3:
            totals["deadlocks"] += 1
            print(f"run {run}: DEADLOCK\n{proc.stderr[-3000:]}")
            continue
        if proc.returncode != 0:
            totals["crashes"] += 1
            print(f"run {run}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"run {run}: {result}")
        for key in ("interrupts", "calls", "in_flight", "breaker_trials", "hedge_threads"):
            totals[key] += result[key]
        totals["reserved_usd"] += Decimal(result["reserved_usd"])
    print("totals:", {k: str(v) for k, v in totals.items()})
    leaked = totals["in_flight"] or totals["reserved_usd"] or totals["breaker_trials"] or totals["hedge_threads"]
    return 1 if leaked or totals["deadlocks"] or totals["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
