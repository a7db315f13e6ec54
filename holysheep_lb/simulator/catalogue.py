"""The 16 scenarios of the public Failover Bench catalogue (methodology v0.1) as model settings.

``SimulatedGateway(nodes, models=failover_bench_models())`` serves ``fb-ok`` (healthy),
``fb-ok-noprefill`` (healthy, rejects an assistant prefill) and one ``fb-sNN-...``
model per scenario that misbehaves as the catalogue describes.  The catalogue's
answer has 60 tokens; the simulator's answer to its prompt has 19 content chunks,
so the chunk positions are scaled (cut after 12, stall after 6, malformed after 3).
``fast=True`` shortens the waits as the catalogue's "fast" profile does.
"""

from __future__ import annotations

from typing import Dict

from .config import SimModel

#: The prompt every scenario sends.
PROMPT = "Explain in exactly sixty words why a gateway earns trust only when the provider behind it misbehaves."


def failover_bench_models(*, fast: bool = False) -> Dict[str, SimModel]:
    """Model name -> setting for every scenario (S14's primary is ``fb-s14-stream-cut``,
    its fallback ``fb-ok-noprefill``; S15 flaps from gateway start or reset_counts())."""
    slow_ttft_s, stall_s, no_response_s, flap_s = (3.0, 4.0, 15.0, 6.0) if fast else (20.0, 30.0, 120.0, 60.0)
    cut = SimModel(fault="stream_cut", fault_after_chunks=12)
    persistent_503 = SimModel(fault="server_error", fault_status=503)
    return {
        "fb-ok": SimModel(),
        "fb-ok-noprefill": SimModel(prefill=False),
        "fb-s01-429-retry-after": SimModel(fault="rate_limit", fault_attempts=1, retry_after_s=2),
        "fb-s02-429-persistent": SimModel(fault="rate_limit"),
        "fb-s03-500-then-200": SimModel(fault="server_error", fault_attempts=1),
        "fb-s04-503-persistent": persistent_503,
        "fb-s05-reset": SimModel(fault="reset", fault_attempts=1),
        "fb-s06-no-response": SimModel(fault="hang", fault_duration_s=no_response_s),
        "fb-s07-slow-ttft": SimModel(fault="slow_first_token", fault_duration_s=slow_ttft_s),
        "fb-s08-stream-cut": cut,
        "fb-s09-stream-stall": SimModel(fault="stream_stall", fault_after_chunks=6, fault_duration_s=stall_s),
        "fb-s10-malformed-chunk": SimModel(fault="malformed_event", fault_after_chunks=3),
        "fb-s11-no-done": SimModel(fault="no_done"),
        "fb-s12-context-length": SimModel(fault="context_length"),
        "fb-s13-content-filter": SimModel(fault="content_policy"),
        "fb-s14-stream-cut": cut,
        "fb-s15-flap": SimModel(fault="flap", fault_duration_s=flap_s),
        "fb-s16-503-persistent": persistent_503,
    }
