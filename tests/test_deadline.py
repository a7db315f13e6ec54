"""The deadline watchdog: cuts a socket once its watch expires, never after it ended."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time

import pytest

from holysheep_lb import deadline
from holysheep_lb.deadline import _PURGE_MIN, THREAD_NAME, Watchdog, watch
from holysheep_lb.errors import ConfigError

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


# -- the thread ends when idle, and the next registration starts another -----------------------


class CountingClock:
    """time.monotonic, counting the reads made on the watchdog's thread (one per round)."""

    def __init__(self) -> None:
        self.rounds = 0

    def __call__(self) -> float:
        if threading.current_thread().name == THREAD_NAME:
            self.rounds += 1
        return time.monotonic()


def test_the_thread_stays_while_a_watch_is_live_and_ends_once_idle():
    clock = CountingClock()
    dog = Watchdog(clock=clock, idle_exit_s=0.01)
    entry = dog.watch(3600.0)
    thread = dog._thread
    assert thread is not None and thread.is_alive() and dog.running
    assert wait_until(lambda: clock.rounds >= 20, 5.0)  # many idle periods long, the watch still live
    assert thread.is_alive() and dog.running and dog._thread is thread
    entry.end()
    assert wait_until(lambda: not thread.is_alive(), 5.0)
    assert not dog.running and dog.pending() == 0  # the ended entry did not outlive the thread either


def test_the_idle_period_is_the_module_constant_unless_given(monkeypatch):
    monkeypatch.setattr(deadline, "IDLE_EXIT_S", 0.02)
    dog = Watchdog()
    dog.watch(3600.0).end()
    thread = dog._thread
    assert thread is not None
    assert wait_until(lambda: not thread.is_alive(), 5.0)
    assert not dog.running


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_a_bad_idle_period_is_a_config_error(bad):
    with pytest.raises(ConfigError) as info:
        Watchdog(idle_exit_s=bad)
    assert info.value.field == "idle_exit_s"


def test_a_watch_after_the_thread_ended_starts_another_that_cuts_the_late_socket(pair):
    a, _ = pair
    dog = Watchdog(idle_exit_s=0.02)
    dog.watch(3600.0).end()
    first = dog._thread
    assert first is not None and wait_until(lambda: not first.is_alive(), 5.0)
    entry = dog.watch(0.05)
    entry.attach(a)
    second = dog._thread
    assert second is not None and second is not first and dog.running
    started = time.monotonic()
    assert a.recv(1) == b""  # cut by the new thread
    assert time.monotonic() - started < 2.0
    assert entry.end() is True and entry.cut


def test_a_watch_registered_while_the_thread_idles_keeps_it_until_the_watch_is_cut(clock, pair):
    a, _ = pair
    reads: list = []

    def counting_clock() -> float:
        if threading.current_thread().name == THREAD_NAME:
            reads.append(clock.now)
        return clock()

    dog = Watchdog(clock=counting_clock, idle_exit_s=0.01)
    dog.watch(5.0).end()
    thread = dog._thread
    assert thread is not None and wait_until(lambda: len(reads) >= 3, 5.0)  # its idle period began
    entry = dog.watch(2.0)
    entry.attach(a)
    clock.advance(1.0)  # past the idle period, before the deadline: a live watch keeps the thread
    seen = len(reads)
    assert wait_until(lambda: len(reads) >= seen + 3, 5.0)
    assert thread.is_alive() and dog._thread is thread
    clock.advance(2.0)
    assert a.recv(1) == b""
    assert entry.end() is True and entry.cut


class LingeringCondition(threading.Condition):
    """The heap's lock, whose release by the watchdog's thread, once armed, waits until
    ``then`` is set: the thread has let go of the lock but not yet run what follows, and
    is still alive."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.armed = False
        self.then = threading.Event()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.armed and threading.current_thread().name == THREAD_NAME:
            self.armed = False
            self.then.wait(5.0)


def test_a_registration_made_while_the_thread_decides_to_end_is_still_watched(clock, pair):
    """The registration waits for the heap's lock while the thread, holding it, decides to
    end, and gets it while that thread is still alive: it must not count on that thread
    (nor on what it does after letting go of the lock) and start another one."""
    a, _ = pair
    reads: list = []
    registered: list = []
    fire_at = [math.inf]
    cond = LingeringCondition()

    def register() -> None:
        registered.append(dog.watch(0.5))  # waits for the lock the deciding thread holds
        cond.then.set()

    def hooked_clock() -> float:
        now = clock()
        if threading.current_thread().name == THREAD_NAME:
            reads.append(now)
            if now >= fire_at[0]:  # the first round past the idle period: the thread ends in it
                fire_at[0] = math.inf
                cond.armed = True
                threading.Thread(target=register, daemon=True).start()
        return now

    dog = Watchdog(clock=hooked_clock, idle_exit_s=0.01)
    dog._heap_cond = cond
    dog.watch(5.0).end()
    old = dog._thread
    assert old is not None
    assert wait_until(lambda: len(reads) >= 3, 5.0)  # idle, on a frozen clock: it cannot end yet
    assert old.is_alive() and dog.running
    fire_at[0] = clock.now + 1.0
    clock.advance(1.0)
    assert wait_until(lambda: registered, 5.0)
    entry = registered[0]
    entry.attach(a)
    assert wait_until(lambda: not old.is_alive(), 5.0)
    new = dog._thread
    assert new is not None and new is not old and new.is_alive()
    clock.advance(1.0)  # the new watch is past its deadline
    assert a.recv(1) == b""
    assert entry.end() is True and entry.cut


def test_registrations_racing_idle_exits_leave_no_late_watch_uncut():
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave far more often than by default
    try:
        _race_idle_exits()
    finally:
        sys.setswitchinterval(switch)


def _race_idle_exits() -> None:
    workers_n = 8
    dog = Watchdog(idle_exit_s=0.001)
    # Rounds: all workers register, then each waits for its own late watch with nobody
    # registering meanwhile, so a registration the thread missed stays missed and is seen.
    barrier = threading.Barrier(workers_n, timeout=30.0)
    threads_seen = set()
    uncut: list = []
    errors: list = []
    seen_lock = threading.Lock()

    def worker(seed: int) -> None:
        pause = threading.Event()  # pacing only: spreads registrations around the thread's idle exits
        rng = random.Random(seed)
        try:
            for i in range(100):
                barrier.wait()
                pause.wait(rng.random() * 0.003)
                dog.watch(3600.0).end()  # ends in time
                entry = dog.watch(0.0)  # already late: the thread must expire it
                sock_pair = socket.socketpair() if i % 10 == seed % 10 else None
                try:
                    if sock_pair is not None:
                        sock_pair[0].settimeout(5.0)
                        entry.attach(sock_pair[0])
                    with seen_lock:
                        threads_seen.add(dog._thread)
                    if not wait_until(lambda: entry._expired, 2.0, 0.001):
                        uncut.append((seed, i))
                    elif sock_pair is not None and sock_pair[0].recv(1) != b"":
                        uncut.append((seed, i, "socket"))
                    entry.end()
                finally:
                    if sock_pair is not None:
                        sock_pair[0].close()
                        sock_pair[1].close()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(workers_n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120.0)
    assert not any(t.is_alive() for t in workers)
    assert errors == [] and uncut == []
    threads_seen.discard(None)
    assert len(threads_seen) > 1  # the thread did end and start again while registrations raced it
    last = dog._thread
    assert last is None or wait_until(lambda: not last.is_alive(), 5.0)
    assert not dog.running


def test_a_thread_that_cannot_start_is_logged_and_the_next_registration_starts_one(monkeypatch, pair, caplog):
    a, _ = pair

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    dog = Watchdog(idle_exit_s=0.05)
    monkeypatch.setattr(deadline.threading, "Thread", NoThread)
    with caplog.at_level(logging.WARNING, logger="holysheep_lb.deadline"):
        first = dog.watch(0.05)  # registered, though no thread watches it yet
    monkeypatch.undo()
    assert not dog.running and "could not start" in caplog.text
    first.attach(a)
    later = dog.watch(3600.0)
    assert dog.running
    assert a.recv(1) == b""  # the thread the later registration started cut the first one
    assert first.end() is True and later.end() is False
