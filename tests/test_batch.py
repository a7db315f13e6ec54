"""Units for the batch API (``Client.map`` / ``run_batch``) with a fake client."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

import pytest
import responses

from holysheep_lb import InternalServerError, InvalidRequestError, Response
from holysheep_lb import batch as batch_module
from holysheep_lb.batch import run_batch

from .conftest import thread_count


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause.wait(0.005)
    return predicate()


def req(i: int, **kw: Any) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}], "model": "m", "i": i, **kw}


class FakeClient:
    """chat_completion(**kw) -> behaviour chosen per index."""

    def __init__(self, behaviour=None) -> None:
        self.started: List[int] = []
        self._lock = threading.Lock()
        self.behaviour = behaviour or (lambda i: None)

    def chat_completion(self, messages, model=None, **params):
        i = params["i"]
        with self._lock:
            self.started.append(i)
        self.behaviour(i)
        return Response({"i": i, "content": messages[0]["content"]}, node_id=f"n{i % 3}")


class RecordingPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that remembers its futures, so fakes can see cancellation."""

    futures: List[Any] = []

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(fn, *args, **kwargs)
        RecordingPool.futures.append(future)
        return future


@pytest.fixture
def recording_pool(monkeypatch):
    RecordingPool.futures = []
    monkeypatch.setattr(batch_module, "ThreadPoolExecutor", RecordingPool)
    return RecordingPool


def none_pending(total: int) -> bool:
    """All ``total`` calls were submitted and each has started, ended or been cancelled."""
    futures = list(RecordingPool.futures)
    return len(futures) == total and all(f.running() or f.done() for f in futures)


def test_results_come_back_in_input_order_even_when_calls_finish_in_reverse():
    n = 6
    finished = [threading.Event() for _ in range(n + 1)]
    finished[n].set()

    def behaviour(i):
        assert finished[i + 1].wait(5)  # call i ends only after call i+1 ended

    client = FakeClient(behaviour)
    original = client.chat_completion

    def tracked(messages, model=None, **params):
        try:
            return original(messages, model, **params)
        finally:
            finished[params["i"]].set()

    client.chat_completion = tracked
    results = run_batch(client, [req(i) for i in range(n)], max_workers=n)
    assert [r["i"] for r in results] == list(range(n))
    assert [r["content"] for r in results] == [f"q{i}" for i in range(n)]


def test_failures_fill_their_slots_with_return_exceptions():
    errors = {}

    def behaviour(i):
        if i % 4 == 1:
            errors[i] = InternalServerError("boom", status_code=502, node_id="x")
            raise errors[i]

    progress = []
    results = run_batch(FakeClient(behaviour), [req(i) for i in range(10)], max_workers=3,
                        on_progress=lambda done, total: progress.append((done, total)))
    assert [i for i, r in enumerate(results) if isinstance(r, InternalServerError)] == [1, 5, 9]
    assert all(results[i] is errors[i] for i in (1, 5, 9))
    assert [r["i"] for i, r in enumerate(results) if i not in errors] == [0, 2, 3, 4, 6, 7, 8]
    assert progress == [(k, 10) for k in range(1, 11)]


def test_first_failure_cancels_calls_not_started_and_is_raised(recording_pool):
    boom = InternalServerError("boom", status_code=500, node_id="x")

    def behaviour(i):
        if i == 0:
            raise boom
        assert wait_until(lambda: none_pending(20))  # hold the workers until the rest is cancelled

    client = FakeClient(behaviour)
    with pytest.raises(InternalServerError) as info:
        run_batch(client, [req(i) for i in range(20)], max_workers=3, return_exceptions=False)
    assert info.value is boom
    # calls 0-2 ran on the 3 workers; call 3 only if a worker took it before cancellation
    assert set(client.started) in ({0, 1, 2}, {0, 1, 2, 3})
    cancelled = [f for f in recording_pool.futures if f.cancelled()]
    assert len(cancelled) == 20 - len(client.started)


def test_keyboard_interrupt_cancels_the_rest_and_leaves_no_threads(recording_pool):
    baseline = thread_count()

    def behaviour(i):
        if i != 0:
            assert wait_until(lambda: none_pending(40))

    def on_progress(done, total):
        raise KeyboardInterrupt

    client = FakeClient(behaviour)
    with pytest.raises(KeyboardInterrupt):
        run_batch(client, [req(i) for i in range(40)], max_workers=4, on_progress=on_progress)
    assert wait_until(lambda: thread_count() == baseline, timeout_s=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("holysheep-batch")]
    assert set(client.started) in ({0, 1, 2, 3}, {0, 1, 2, 3, 4})
    assert sum(f.cancelled() for f in recording_pool.futures) == 40 - len(client.started)


def test_a_bug_in_a_call_is_raised_even_with_return_exceptions():
    def behaviour(i):
        if i == 2:
            raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run_batch(FakeClient(behaviour), [req(i) for i in range(5)], max_workers=2)


def test_empty_batch_starts_no_thread():
    baseline = thread_count()
    assert run_batch(FakeClient(), [], max_workers=4) == []
    assert thread_count() == baseline


@pytest.mark.parametrize("kwargs, field", [
    ({"max_workers": 0}, "max_workers"),
    ({"max_workers": True}, "max_workers"),
    ({"max_workers": 2.5}, "max_workers"),
    ({"on_progress": "print"}, "on_progress"),
])
def test_bad_options_are_rejected_before_any_call(kwargs, field):
    client = FakeClient()
    with pytest.raises(InvalidRequestError) as info:
        run_batch(client, [req(0)], **kwargs)
    assert info.value.field == field
    assert client.started == []


@pytest.mark.parametrize("requests, field", [
    ("hello", "requests"),
    ({"messages": []}, "requests"),
    ([req(0), "hello"], "requests[1]"),
    ([req(0), {"model": "m"}], "requests[1]"),
    ([req(0, stream=True)], "requests[0].stream"),
])
def test_bad_requests_are_rejected_before_any_call(requests, field):
    client = FakeClient()
    with pytest.raises(InvalidRequestError) as info:
        run_batch(client, requests)
    assert info.value.field == field
    assert client.started == []


@responses.activate
def test_client_map_runs_real_calls_and_returns_typed_errors(make_client):
    url = "http://127.0.0.1:9/v1/chat/completions"

    def reply(request):
        import json
        body = json.loads(request.body)
        return 200, {}, json.dumps({"echo": body["messages"][0]["content"]})

    responses.add_callback(responses.POST, url, callback=reply)
    client = make_client([{"id": "a", "base_url": "http://127.0.0.1:9/v1"}])
    requests = [{"messages": [{"role": "user", "content": f"p{i}"}], "model": "m"} for i in range(5)]
    requests[3]["temperature"] = 7  # invalid: caught before sending, returned in its slot
    results = client.map(requests, max_workers=2)
    assert [r["echo"] for i, r in enumerate(results) if i != 3] == ["p0", "p1", "p2", "p4"]
    assert isinstance(results[3], InvalidRequestError)
    assert results[3].field == "temperature"
    assert len(responses.calls) == 4
    assert client.stats()["calls"] == 4
