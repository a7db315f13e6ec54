"""Load shapes and measurements the routing benchmarks share (no gateway in here).

``run_paced`` is an open-loop generator: calls start on a fixed schedule whatever the
answers do, as independent users would send them (a closed loop of N threads slows
down with the server and hides overload). The rest reads a :class:`LoadResult`.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from holysheep_lb.errors import HolySheepError
from holysheep_lb.loadgen import LoadResult


@dataclass
class PacedResult:
    """A paced run: what callers saw, how many calls were offered and how late the
    generator started the latest one (large when every thread was busy)."""

    load: LoadResult
    offered: int
    max_late_ms: float


def run_paced(call: Callable[[int], Any], *, rate_per_s: float, duration_s: float, max_threads: int,
              label: str = "", clock: Callable[[], float] = time.perf_counter,
              sleep: Callable[[float], None] = time.sleep) -> PacedResult:
    """Start ``call(i)`` every ``1 / rate_per_s`` seconds for ``duration_s`` seconds on up
    to ``max_threads`` threads, then wait for the calls still running.

    Counts like :func:`holysheep_lb.loadgen.run_load`: a HolySheepError is a result
    (by type), any other exception is a bug and is raised once every call has ended.
    """
    if rate_per_s <= 0 or duration_s <= 0 or max_threads < 1:
        raise ValueError(f"rate_per_s ({rate_per_s}) and duration_s ({duration_s}) must be > 0 "
                         f"and max_threads ({max_threads}) >= 1")
    result = LoadResult(label=label)
    result_lock = threading.Lock()
    free_threads = threading.BoundedSemaphore(max_threads)  # bounds the queue: no backlog builds up
    bugs: List[BaseException] = []
    offered = int(rate_per_s * duration_s)
    started = clock()

    def one(i: int) -> None:
        try:
            t0 = clock()
            node: Optional[str] = None
            error: Optional[str] = None
            try:
                node = getattr(call(i), "node_id", None)
            except HolySheepError as exc:
                error = type(exc).__name__
            t1 = clock()
            with result_lock:
                result.calls += 1
                result.per_second[int(t1 - started)] += 1
                if error is None:
                    result.latencies_ms.append((t1 - t0) * 1000.0)
                    result.node_share[node or "?"] += 1
                else:
                    result.errors[error] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by the dispatcher
            with result_lock:
                bugs.append(exc)
        finally:
            free_threads.release()

    max_late_s = 0.0
    with ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="paced") as pool:
        for i in range(offered):
            due = started + i / rate_per_s
            ahead_s = due - clock()
            if ahead_s > 0:
                sleep(ahead_s)
            free_threads.acquire()
            max_late_s = max(max_late_s, clock() - due)
            pool.submit(one, i)
            if bugs:
                break
    result.wall_s = clock() - started
    if bugs:
        raise bugs[0]
    return PacedResult(result, offered, round(max_late_s * 1000.0, 1))


def full_seconds(result: LoadResult, duration_s: float) -> List[int]:
    """Calls completed in each whole second of ``[0, duration_s)`` (a partial last second is left out)."""
    return [result.per_second[k] for k in range(max(1, int(duration_s)))]


def worst_second_ratio(per_second: List[int]) -> float:
    """The worst second as a fraction of the median second (0 when nothing completed)."""
    median = statistics.median(per_second) if per_second else 0
    return (min(per_second) / median) if median else 0.0


def steady_rps(result: LoadResult, duration_s: float) -> float:
    """Throughput over the whole seconds of a time-boxed run: calls still running when
    it was stopped (the drain) do not dilute it, as they do ``calls / wall_s``."""
    seconds = full_seconds(result, duration_s)
    return sum(seconds) / len(seconds)


def spend_quotas(base_urls: List[str], *, model: str = "gpt-4.1", threads: int = 16,
                 deadline_s: float = 60.0) -> None:
    """Send plain chat requests to every ``base_url`` (``.../v1``) until each answers
    429, twice over (the second pass takes what refilled during the first), so a run
    starts on spent request quotas: a quota starts full, and a minute's burst would
    hide for a whole minute whether routing keeps each node under its sustained rate.
    Fastest with the nodes' latency at 0. RuntimeError if it takes over ``deadline_s``."""
    body = {"model": model, "messages": [{"role": "user", "content": "spend the quota"}]}
    stop_at = time.monotonic() + deadline_s
    for _ in range(2):
        left = _spend_once(base_urls, body, threads, stop_at)
        if left:
            raise RuntimeError(f"request quotas not spent within {deadline_s} s: {left}")


def _spend_once(base_urls: List[str], body: Dict[str, Any], threads: int, stop_at: float) -> List[str]:
    """One pass of :func:`spend_quotas`; the URLs that never answered 429."""
    import requests  # the client's own dependency; imported here as only this helper needs it

    spent = [False] * len(base_urls)
    spent_lock = threading.Lock()
    turn = [0]

    def next_url() -> Optional[int]:
        with spent_lock:
            left = [i for i, done in enumerate(spent) if not done]
            if not left:
                return None
            turn[0] += 1
            return left[turn[0] % len(left)]

    def worker() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                index = next_url()
                if index is None:
                    return
                reply = session.post(f"{base_urls[index]}/chat/completions", json=body, timeout=10)
                if reply.status_code == 429:
                    with spent_lock:
                        spent[index] = True

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spend") as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    return [url for url, done in zip(base_urls, spent) if not done]
