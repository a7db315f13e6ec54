"""The fault scenario shared by the CI stress test and ``benchmarks/soak.py``.

Four simulated nodes, each failing 5% of requests with a 5xx, resetting 2% of
connections and answering 1% with malformed JSON; a :class:`Chaos` thread makes one
node flap (refusing connections, then listening again) and another hang for a while.
:class:`Tally` counts what callers saw, so the test can reconcile it with the client's
``stats()`` and the gateway's own counts.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional

from holysheep_lb import Client
from holysheep_lb.errors import HolySheepError
from holysheep_lb.simulator import SimulatedGateway

from ..conftest import wait_until  # noqa: F401 - part of this module's toolkit

CHAT_PATH = "/v1/chat/completions"
MODEL = "deepseek-v3.2"
HANGING, FLAPPING = "c", "d"
FAULT_RATES = {"error_rate": 0.05, "reset_rate": 0.02, "malformed_rate": 0.01}
NODES = [
    {"id": node_id, "region": region, "latency_ms": 1.0, "p99_latency_ms": 8.0, **FAULT_RATES}
    for node_id, region in zip("abcd", ("us-east", "eu-west", "ap-southeast", "ap-northeast"))
]
# What the client sees for each gateway outcome (stats.FAILURE_KINDS; "ok" is a success).
CLIENT_KIND = {"error_5xx": "status_5xx", "malformed": "invalid_response"}

CLIENT_OPTIONS: Dict[str, Any] = dict(
    strategy="adaptive",
    pool_maxsize=64,
    connect_timeout_s=2.0,
    read_timeout_s=2.0,  # a hung request fails after this; a healthy one takes milliseconds
    stream_first_chunk_timeout_s=2.0,
    deadline_s=30.0,
    ejection_base_s=0.2,  # an ejected node comes back within the run and is tried again
    ejection_max_s=1.0,
    health_check_interval_s=0.2,
    health_check_timeout_s=0.5,
)


class Chaos:
    """A bounded background thread: ``flapping`` toggles between refusing and listening
    every ``flap_period_s``; ``hanging`` hangs from ``hang_at_s`` for ``hang_for_s``
    (again every ``hang_every_s``, when given).

    It stops by itself after ``max_s``; :meth:`stop` ends it early and leaves both
    nodes healthy (which also releases the requests the hang still holds).
    """

    def __init__(self, gateway: SimulatedGateway, *, flapping: str = FLAPPING, hanging: str = HANGING,
                 flap_period_s: float = 0.15, hang_at_s: float = 0.3, hang_for_s: float = 3.0,
                 hang_every_s: Optional[float] = None, max_s: float = 60.0) -> None:
        self.gateway = gateway
        self.flapping = flapping
        self.hanging = hanging
        self.flap_period_s = flap_period_s
        self.hang_at_s = hang_at_s
        self.hang_for_s = hang_for_s
        self.hang_every_s = hang_every_s
        self.max_s = max_s
        self.flaps = 0
        self.hangs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-chaos", daemon=True)

    def __enter__(self) -> "Chaos":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        started = time.monotonic()
        refusing = hanging = False
        while not self._stop.wait(self.flap_period_s):
            elapsed = time.monotonic() - started
            if elapsed > self.max_s:
                break
            refusing = not refusing
            self.gateway.configure(self.flapping, fault="refuse" if refusing else None)
            self.flaps += 1
            since = elapsed - self.hang_at_s
            if self.hang_every_s:
                since %= self.hang_every_s
            want_hang = elapsed >= self.hang_at_s and since < self.hang_for_s
            if want_hang != hanging:
                hanging = want_hang
                self.gateway.configure(self.hanging, fault="hang" if hanging else None)
                self.hangs += hanging
        self._heal()

    def _heal(self) -> None:
        self.gateway.configure(self.flapping, fault=None)
        self.gateway.configure(self.hanging, fault=None)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the chaos thread did not stop"


class Tally:
    """What callers saw: calls, successes, typed errors by class, attempts; thread-safe.

    Anything that is not a :class:`HolySheepError` is kept in ``escaped`` (the first
    20, as repr) instead of being raised, so one stray error does not stop the run.
    """

    def __init__(self) -> None:
        self._tally_lock = threading.Lock()
        self.calls = 0
        self.successes = 0
        self.errors: Counter = Counter()
        self.attempts = 0
        self.streams = 0
        self.streams_opened = 0  # got past the first chunk: a ChatStream was returned
        self.escaped: List[str] = []
        self.escaped_count = 0

    def record(self, *, ok: bool, attempts: int, error: Optional[str] = None, stream: bool = False,
               opened: bool = False) -> None:
        with self._tally_lock:
            self.calls += 1
            self.attempts += attempts
            self.streams += stream
            self.streams_opened += opened
            if ok:
                self.successes += 1
            else:
                self.errors[error] += 1

    def escape(self, exc: BaseException) -> None:
        with self._tally_lock:
            self.calls += 1
            self.escaped_count += 1
            if len(self.escaped) < 20:
                self.escaped.append(repr(exc))


def one_call(client: Client, i: int, tally: Tally, *, stream_every: int = 8) -> None:
    """Call ``i``: every ``stream_every``-th is a stream read to its end; records the outcome."""
    messages = [{"role": "user", "content": f"stress call {i}: say something short"}]
    stream = stream_every > 0 and i % stream_every == 0
    handle: Any = None
    try:
        if stream:
            handle = client.chat_completion(messages, model=MODEL, stream=True, max_tokens=8)
            with handle:
                handle.read_text()
        else:
            handle = client.chat_completion(messages, model=MODEL, max_tokens=8)
        tally.record(ok=True, attempts=len(handle.attempts), stream=stream, opened=stream)
    except HolySheepError as exc:
        # a stream broken after its first chunk: its attempts are on the stream
        attempts = getattr(exc, "attempts", None)
        if attempts is None and handle is not None:
            attempts = handle.attempts
        tally.record(ok=False, attempts=len(attempts or ()), error=type(exc).__name__, stream=stream,
                     opened=handle is not None)
    except Exception as exc:  # noqa: BLE001 - counted: the test asserts there are none
        tally.escape(exc)


def counter_mismatches(stats: Dict[str, Any], tally: Tally) -> List[str]:
    """Every way the client's counters must agree with what callers saw; [] when they do."""
    problems = []
    if tally.escaped_count:
        problems.append(f"{tally.escaped_count} calls raised something untyped: {tally.escaped[:3]}")
    if stats["calls"] != tally.calls or stats["successes"] + stats["failures"] != stats["calls"]:
        problems.append(f"calls {stats['calls']} != {tally.calls} or != successes + failures")
    if stats["successes"] != tally.successes or stats["failures_by_error"] != dict(tally.errors):
        problems.append(f"outcomes {stats['successes']} {stats['failures_by_error']} != "
                        f"{tally.successes} {dict(tally.errors)}")
    nodes = stats["nodes"]
    if sum(n["requests"] for n in nodes.values()) != tally.attempts:
        problems.append(f"nodes counted {sum(n['requests'] for n in nodes.values())} attempts, "
                        f"callers were told of {tally.attempts}")
    for node_id, n in nodes.items():
        if n["requests"] != n["successes"] + sum(n["failures"].values()):
            problems.append(f"node {node_id}: {n['requests']} requests != successes + failures")
    if stats["in_flight"] != 0:
        problems.append(f"{stats['in_flight']} still in flight")
    streams = stats["streams"]
    if streams["completed"] + streams["interrupted"] != tally.streams_opened or streams["cancelled"]:
        problems.append(f"streams {streams} vs {tally.streams_opened} opened")
    return problems


def gateway_mismatches(gateway: SimulatedGateway, nodes: Dict[str, Dict[str, Any]], *,
                       allow_late: bool = False) -> List[str]:
    """Where the client's per-node counts disagree with the gateway's own; [] when they agree.

    Exact for every node but the flapping one: a refused connection never reaches it,
    and a request caught by a flap may reach it and die unanswered. ``allow_late``
    accepts answers the gateway wrote after the client had timed out (a loaded machine
    can take longer than the read timeout): an answer there, a timeout here.
    """
    problems = []
    for node_id, node in nodes.items():
        seen = gateway.outcomes(node_id, CHAT_PATH)
        received = gateway.request_count(node_id, CHAT_PATH)
        answered = sum(seen.values())
        gaps = [seen.get(what, 0) - n for what, n in _answers_seen(node).items()]
        if node_id == FLAPPING:
            if not (node["requests"] >= received >= answered and all(gap >= 0 for gap in gaps)):
                problems.append(f"{node_id}: client {node} vs gateway {received} {seen}")
            continue
        unanswered = sum(node["failures"][k] for k in ("connect", "timeout", "ttft_timeout", "stall"))
        exact = (received == node["requests"] == answered
                 and all(gap == 0 or (allow_late and gap > 0) for gap in gaps)
                 and seen.get("reset", 0) + seen.get("hang", 0) + sum(gaps) == unanswered)
        if not exact:
            problems.append(f"{node_id}: client {node} vs gateway {received} {seen}")
    return problems


def _answers_seen(node: Dict[str, Any]) -> Dict[str, int]:
    """Gateway outcome -> how many of those answers the client received as such."""
    return {"ok": node["successes"], **{what: node["failures"][kind] for what, kind in CLIENT_KIND.items()}}


def late_answers(gateway: SimulatedGateway, nodes: Dict[str, Dict[str, Any]]) -> int:
    """Answers the gateway wrote after the client had given up on them (not the flapping node)."""
    return sum(max(0, gateway.outcomes(node_id, CHAT_PATH).get(what, 0) - n)
               for node_id, node in nodes.items() if node_id != FLAPPING
               for what, n in _answers_seen(node).items())


def attempts_by_node(client: Client) -> Dict[str, Dict[str, Any]]:
    """Per node: attempts picked, successes and failures by kind (from ``stats()``)."""
    return {node_id: {"requests": s["requests"], "successes": s["successes"], "failures": s["failures"]}
            for node_id, s in client.stats()["nodes"].items()}
