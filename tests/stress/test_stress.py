"""64 threads against four faulty simulated nodes: every call typed, every counter reconciled.

Each node fails 5% of requests with a 5xx, resets 2% of connections and answers 1% with
malformed JSON; node ``d`` flaps (refusing connections every other 150 ms) and node
``c`` hangs for 3 s. One call in eight is a stream read to its end. The longer run is
``python benchmarks/soak.py``.
"""

from __future__ import annotations

import os
import threading

import pytest

from holysheep_lb import Client
from holysheep_lb.deadline import THREAD_NAME as WATCHDOG_THREAD
from holysheep_lb.loadgen import run_load
from holysheep_lb.simulator import SimulatedGateway
from holysheep_lb.stats import FAILURE_KINDS

from .scenario import CHAT_PATH, CLIENT_OPTIONS, FLAPPING, HANGING, NODES, Chaos, Tally, attempts_by_node, \
    counter_mismatches, gateway_mismatches, one_call, wait_until

CALLS = 3000
THREADS = 64


def _os_threads():
    """The process's live OS threads (Linux), or threading's count elsewhere."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _extra_threads(baseline_names):
    return sorted(t.name for t in threading.enumerate()
                  if t.name not in baseline_names and not isinstance(t, threading._DummyThread))


@pytest.fixture(scope="module")
def run():
    """Run the scenario once; the tests below check different parts of its outcome."""
    gateway = SimulatedGateway(NODES, seed=11).start()
    try:
        baseline_os = _os_threads()
        # the deadline watchdog is one daemon thread for the whole process (deadline.py),
        # started by the first call that needs it, shared by every client and ended once idle
        # for IDLE_EXIT_S: not the client's. It may be running or not at either count below
        # (hence the + 1 on the OS threads, and its name among the baseline's)
        baseline_names = {t.name for t in threading.enumerate()} | {WATCHDOG_THREAD}
        client = Client(api_key="sk-stress-test", nodes=gateway.client_nodes(), **CLIENT_OPTIONS)
        tally = Tally()
        with Chaos(gateway) as chaos:
            run_load(lambda i: one_call(client, i, tally), requests=CALLS, concurrency=THREADS)
        health = client.health_checker
        result = {
            "tally": tally, "chaos": chaos, "gateway": gateway, "stats": client.stats(),
            "nodes": attempts_by_node(client), "snapshot": client.nodes(),
            "health_alive": health is not None and health.running,
            "health_loop_errors": health.loop_errors if health else None,
        }
        client.close()
        # a _DummyThread (a thread started with _thread that logged) stays in threading's
        # table after it ends: what counts is the Thread objects left, and the OS threads
        result["threads_back"] = wait_until(
            lambda: not _extra_threads(baseline_names) and _os_threads() <= baseline_os + 1, 10.0)
        result["threads"] = (_os_threads(), baseline_os, _extra_threads(baseline_names))
        yield result
    finally:
        gateway.stop()


def test_every_call_ends_in_success_or_a_typed_error(run):
    tally = run["tally"]
    assert tally.escaped == [] and tally.escaped_count == 0
    assert tally.calls == CALLS
    assert tally.successes + sum(tally.errors.values()) == CALLS
    assert tally.streams == CALLS // 8 + (CALLS % 8 > 0)
    # the load held: faults were absorbed by failover, not passed on
    assert tally.successes >= 0.98 * CALLS, tally.errors


def test_call_counters_reconcile_exactly(run):
    assert counter_mismatches(run["stats"], run["tally"]) == []
    assert run["stats"]["calls"] == CALLS
    assert all(set(n["failures"]) == set(FAILURE_KINDS) for n in run["nodes"].values())


def test_nothing_is_left_in_flight(run):
    assert run["stats"]["in_flight"] == 0
    assert all(n["in_flight"] == 0 and n["awaiting"] == 0 for n in run["snapshot"])


def test_client_attempts_match_what_the_gateway_saw(run):
    # a node counts an answer just after writing it, so the client may have seen it first
    assert wait_until(lambda: not gateway_mismatches(run["gateway"], run["nodes"]), 5.0), \
        gateway_mismatches(run["gateway"], run["nodes"])


def test_the_faults_really_happened(run):
    gateway, nodes = run["gateway"], run["nodes"]
    totals = {}
    for node_id in "abcd":
        for what, n in gateway.outcomes(node_id, CHAT_PATH).items():
            totals[what] = totals.get(what, 0) + n
    assert totals["error_5xx"] > 0 and totals["reset"] > 0 and totals["malformed"] > 0
    assert gateway.outcomes(HANGING, CHAT_PATH).get("hang", 0) > 0
    assert nodes[HANGING]["failures"]["timeout"] > 0
    assert run["chaos"].flaps >= 4 and run["chaos"].hangs == 1
    # The client met the refusals: calls that were refused, or (when the strategy had
    # already learned to keep calls off the flapping node) its health probes.
    refused = nodes[FLAPPING]["requests"] - gateway.request_count(FLAPPING, CHAT_PATH)
    probe_failures = {n["id"]: n["probe_failures"] for n in run["snapshot"]}[FLAPPING]
    assert refused >= 0 and refused + probe_failures > 0


def test_health_thread_survived_and_threads_are_released(run):
    assert run["health_alive"] and run["health_loop_errors"] == 0
    assert run["threads_back"], run["threads"]
