"""Concurrent streams through cut, stalled and malformed answers, with rescue on (issue #13).

Node ``a`` breaks every stream of three models (cut after 2 chunks, a stall, one event
that does not parse); node ``b`` is healthy. Every call must end with the whole
canonical answer or a typed error: never a truncated success. Bounded: a fixed number
of calls on a bounded pool, every wait under a client timeout.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from holysheep_lb import Client, HolySheepError
from holysheep_lb.simulator import SimModel, SimNode, SimulatedGateway, reply_text

MSGS = [{"role": "user", "content": "tell me a story about stream rescue"}]
FAULTS = {
    "m-cut": SimModel(fault="stream_cut", fault_after_chunks=2),
    "m-stall": SimModel(fault="stream_stall", fault_after_chunks=2, fault_duration_s=2.0),
    "m-bad": SimModel(fault="malformed_event", fault_after_chunks=2),
}
CALLS = 36


def test_cut_stalled_and_malformed_streams_end_whole_or_typed_with_rescue_on():
    nodes = [SimNode("a", latency_ms=1.0, p99_latency_ms=2.0, models=FAULTS),
             SimNode("b", latency_ms=1.0, p99_latency_ms=2.0)]
    with SimulatedGateway(nodes, seed=13) as gw:
        with Client(api_key="sk-stress", nodes=gw.client_nodes(), strategy="round_robin",
                    health_check_interval_s=None, read_timeout_s=2.0, stream_first_chunk_timeout_s=2.0,
                    stream_stall_timeout_s=0.3, deadline_s=10.0, retry_budget_ratio=None,
                    model_capabilities={"m-cut": {"prefill": True}}) as client:
            def call(i: int):
                model = sorted(FAULTS)[i % len(FAULTS)]
                try:
                    with client.chat_completion(MSGS, model=model, stream=True) as stream:
                        return model, stream.read_text(), None
                except HolySheepError as exc:
                    return model, None, exc

            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(pool.map(call, range(CALLS)))
            stats = client.stats()
    wrong = [(m, text) for m, text, _ in results if text is not None and text != reply_text(m, MSGS)]
    assert not wrong, wrong  # never a truncated (or doubled) answer reported as a success
    answered = sum(1 for _, text, _ in results if text is not None)
    assert answered == CALLS, [exc for _, _, exc in results if exc is not None]
    streams = stats["streams"]
    assert streams["rescued"] > 0 and streams["skipped_events"] > 0, streams
    assert stats["in_flight"] == 0
