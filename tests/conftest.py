"""Shared fixtures: a fake clock, a recording sleep, and a helper for building clients."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List

import pytest
import responses

from holysheep_lb import Client
from holysheep_lb.deadline import THREAD_NAME as WATCHDOG_THREAD

API_KEY = "sk-test-SECRET-never-log-me-1234567890"


class FakeClock:
    """A monotonic clock that moves only when told to (or when fake-slept)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 3.0, interval_s: float = 0.01) -> bool:
    """Bounded polling (no bare sleeps): True once predicate() holds."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause.wait(interval_s)
    return predicate()


def thread_count() -> int:
    """``threading.active_count()`` without the deadline watchdog, which a call may start
    and which ends on its own once idle (deadline.py): whatever the test under way does."""
    return sum(1 for t in threading.enumerate() if t.name != WATCHDOG_THREAD)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client():
    made: List[Client] = []

    def factory(nodes=None, **kw) -> Client:
        kw.setdefault("health_check_interval_s", None)
        kw.setdefault("api_key", API_KEY)
        client = Client(nodes=nodes, **kw)
        made.append(client)
        return client

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="holysheep_lb")
    return caplog


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


def chat_body(model: str = "gpt-4.1", prompt_tokens: int = 5, completion_tokens: int = 1) -> dict:
    """A chat.completion answer saying "hi" with the given usage."""
    return {"id": "x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
