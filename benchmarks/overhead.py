"""Per-call overhead of Client.chat_completion vs a raw requests.Session.post.

One simulated node at 0 ms latency, served from a separate process. Both loops run
side by side in one run, interleaved in rounds, at 1 and 8 threads; the reported
number is the ratio of throughputs (client / raw), so machine noise largely cancels.
Target: >= 1.2 at both thread counts (the client's pooled, environment-free sends more
than pay for its routing and bookkeeping). A second ratio compares with a raw session
whose ``trust_env`` is off (no per-call proxy/netrc lookups), to show the client's own
bookkeeping cost apart from that saving.

    python benchmarks/overhead.py [--seconds 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _simproc import GatewayProcess  # noqa: E402
from holysheep_lb import Client  # noqa: E402

MSGS = [{"role": "user", "content": "hello"}]
TARGET = 1.2


def measure(call, threads: int, seconds: float) -> float:
    """Calls per second of ``call`` from ``threads`` threads for about ``seconds``."""
    stop = threading.Event()
    counts = [0] * threads

    def worker(k: int) -> None:
        n = 0
        while not stop.is_set():
            call()
            n += 1
        counts[k] = n

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, k) for k in range(threads)]
        t0 = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
    return sum(counts) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with GatewayProcess([{"id": "n1", "latency_ms": 0}]) as gw:
        url = gw.client_nodes[0]["base_url"] + "/chat/completions"
        raw = requests.Session()
        raw.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))
        body = {"model": "gpt-4.1", "messages": MSGS}

        def raw_call():
            r = raw.post(url, json=body, timeout=(5, 60))
            r.raise_for_status()
            return r.json()

        raw_noenv = requests.Session()
        raw_noenv.trust_env = False
        raw_noenv.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))

        def raw_noenv_call():
            r = raw_noenv.post(url, json=body, timeout=(5, 60))
            r.raise_for_status()
            return r.json()

        client = Client(nodes=gw.client_nodes, health_check_interval_s=None)

        def client_call():
            return client.chat_completion(MSGS, model="gpt-4.1")

        raw_call(), raw_noenv_call(), client_call()  # warm the pools
        print(f"{'threads':>7} {'raw req/s':>10} {'client req/s':>13} {'ratio':>7}"
              f" {'raw trust_env=False':>20} {'ratio':>7}   (medians of {args.rounds} interleaved rounds)")
        ok = True
        for threads in (1, 8):
            ratios, ratios_noenv, raws, noenvs, ours = [], [], [], [], []
            for _ in range(args.rounds):
                r = measure(raw_call, threads, args.seconds)
                c = measure(client_call, threads, args.seconds)
                n = measure(raw_noenv_call, threads, args.seconds)
                raws.append(r)
                ours.append(c)
                noenvs.append(n)
                ratios.append(c / r)
                ratios_noenv.append(c / n)
            ratio = statistics.median(ratios)
            ok &= ratio >= TARGET
            print(f"{threads:>7} {statistics.median(raws):>10.0f} {statistics.median(ours):>13.0f} {ratio:>7.3f}"
                  f" {statistics.median(noenvs):>20.0f} {statistics.median(ratios_noenv):>7.3f}")
        stats = client.stats()
        client.close()
        assert stats["failures"] == 0 and stats["in_flight"] == 0
    print(f"target client/raw >= {TARGET} at 1 and 8 threads: {'met' if ok else 'NOT met'}")
    print("reproduce: python benchmarks/overhead.py --seconds %g --rounds %d" % (args.seconds, args.rounds))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
