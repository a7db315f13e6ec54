"""The deadline watchdog: cuts a socket once its watch expires, never after it ended."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from holysheep_lb.deadline import _PURGE_MIN, Watchdog, watch

from .conftest import wait_until


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10.0)  # a bound for the test itself, far above every deadline used here
    b.settimeout(10.0)
    yield a, b
    a.close()
    b.close()


def test_a_read_blocked_past_the_deadline_returns_at_once(pair):
    a, _ = pair
    entry = watch(0.05)
    entry.attach(a)
    started = time.monotonic()
    assert a.recv(1) == b""  # shut down: the read ends instead of waiting for data
    assert time.monotonic() - started < 2.0
    assert entry.end() is True and entry.cut


def test_a_watch_ended_in_time_never_touches_its_socket(pair):
    a, b = pair
    first = watch(0.01)
    first.attach(a)
    assert first.end() is False
    c, d = socket.socketpair()
    try:
        later = watch(0.05)  # expires after `first`: once it has cut, `first` was due long ago
        later.attach(c)
        assert c.recv(1) == b"" and later.end()
    finally:
        c.close()
        d.close()
    b.sendall(b"x")
    assert a.recv(1) == b"x"  # still open
    assert not first.cut


def test_a_deadline_that_passes_before_the_socket_exists_cuts_it_on_attach(pair):
    a, _ = pair
    entry = watch(0.0)
    assert wait_until(lambda: entry._expired, 2.0)
    entry.attach(a)
    assert entry.cut and a.recv(1) == b""


def test_the_heap_stays_small_while_exchanges_end_in_time():
    dog = Watchdog()
    for _ in range(20_000):
        dog.watch(3600.0).end()
    assert dog.pending() <= 2 * _PURGE_MIN
    live = [dog.watch(3600.0) for _ in range(500)]
    for entry in live[:250]:
        entry.end()
    assert 250 <= dog.pending() <= 500
    for entry in live[250:]:
        entry.end()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_after_fork_gets_its_own_watchdog_thread(pair):
    watch(3600.0).end()  # the parent's thread is running
    a, _ = pair
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            signal.alarm(20)
            os.close(read_fd)
            entry = watch(0.05)
            entry.attach(a)
            ok = a.recv(1) == b"" and entry.end()
            os.write(write_fd, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "child did not finish"
            threading.Event().wait(0.02)
        answer = os.read(read_fd, 16)
    finally:
        os.close(read_fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert answer == b"ok"
