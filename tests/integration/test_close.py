"""close() while calls are in flight: they end without new attempts or connections, and
nothing stays open once they have."""

from __future__ import annotations

import threading

from holysheep_lb import Client, HolySheepError

from ..conftest import API_KEY, wait_until
from .slow_server import SlowServer, json_answer

MSGS = [{"role": "user", "content": "hi"}]
THREADS = 6


def test_close_with_calls_in_flight_starts_no_new_attempt_and_leaves_no_socket_open():
    failing = json_answer({"error": {"message": "busy"}}, status=503)
    with SlowServer(failing, delay_s=0.15) as server:
        nodes = [{"id": "a", "base_url": server.base_url}, {"id": "b", "base_url": server.base_url}]
        client = Client(api_key=API_KEY, nodes=nodes, health_check_interval_s=None, max_retries=8,
                        backoff_base_s=0.001, backoff_cap_s=0.001, retry_budget_ratio=None, breaker=None,
                        eject_after_failures=1000)
        errors = []
        errors_lock = threading.Lock()

        def call():
            try:
                client.chat_completion(MSGS, model="m")
            except Exception as exc:  # noqa: BLE001 - collected and checked below
                with errors_lock:
                    errors.append(exc)

        threads = [threading.Thread(target=call, daemon=True) for _ in range(THREADS)]
        for t in threads:
            t.start()
        assert wait_until(lambda: sum(server.requests.values()) >= 2 * THREADS, 10.0)  # retrying by now
        client.close()
        at_close = sum(server.requests.values())
        for t in threads:
            t.join(10.0)
        assert not any(t.is_alive() for t in threads)
        after = sum(server.requests.values())
        # every call ended with a typed error, after at most the attempt it was making
        assert len(errors) == THREADS and all(isinstance(e, HolySheepError) for e in errors), errors
        assert after - at_close <= THREADS, (at_close, after)
        assert wait_until(lambda: server.open_connections == 0, 5.0), server.open_connections
        assert "closed" in str(errors[0])
