"""A deadline for a whole HTTP exchange, headers included: a watchdog thread that cuts late sockets.

A socket timeout bounds each read, not an exchange: a node that sends its status line
one byte every half second never trips a one-second read timeout, and would hold a
call (or a health probe) for as long as it likes. So the transport registers each
exchange with :func:`watch`; the connection classes below hand the watch their socket
as soon as it exists (connect, TLS handshake, send, status line, headers, body). If the
deadline passes first, the watchdog thread shuts the socket down
(``shutdown(SHUT_RDWR)``): the blocked read returns at once, and the transport, seeing
:attr:`Watch.cut`, raises :class:`~holysheep_lb.errors.APITimeoutError`.

One daemon thread per process at most, started by the first registration. Once it has
had no live exchange to watch for :data:`IDLE_EXIT_S` seconds it ends, and the next
registration starts another (so does the first one in a child after ``fork()``). Both
decisions are made under the heap's lock: a registration either lands in the heap
before the thread looks at it one last time, or finds the thread gone and starts a new
one, so no exchange is left unwatched. Registrations wait in a heap ordered by deadline;
the heap's lock is held for pushes, pops and those decisions only, never while a socket
is touched, and entries of exchanges that ended are purged once they are half the heap,
so memory follows the exchanges in flight. Per exchange: a heap push and a few
uncontended lock acquisitions.

A watch ends when the transport says so or when its connection goes back to the pool
or is closed, whichever comes first; a watch that ended never touches its socket
again, so a pooled connection is never cut under another exchange.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from requests.adapters import HTTPAdapter
from urllib3 import connection as _connection
from urllib3 import connectionpool as _connectionpool
from urllib3 import poolmanager as _poolmanager

from . import forksafe
from .errors import ConfigError

__all__ = ["Watch", "Watchdog", "watch", "WatchedAdapter", "TransportClosedError", "IDLE_EXIT_S", "THREAD_NAME"]

log = logging.getLogger(__name__)

# Ended entries are purged from the heap once there are this many and they are at least
# half of it: O(1) amortised per exchange, memory proportional to the exchanges in flight.
_PURGE_MIN = 64
#: Seconds the watchdog thread stays with no live exchange to watch before it ends (a
#: :class:`Watchdog` built without ``idle_exit_s`` reads it at each decision).
IDLE_EXIT_S = 5.0
#: The watchdog thread's name.
THREAD_NAME = "holysheep-lb-deadline"


class Watch:
    """One exchange's deadline (``time.monotonic()`` seconds). Thread-safe.

    ``cut`` becomes True when the deadline passed while a socket was attached and the
    watchdog shut it down. ``sent`` is set by the connection once the request was
    handed to the socket in full (a timeout after that may have been billed).
    """

    __slots__ = ("deadline", "sent", "cut", "_sock_lock", "_sock", "_expired", "_ended", "_in_heap", "_owner")

    def __init__(self, deadline: float, owner: "Watchdog") -> None:
        self.deadline = deadline
        self.sent = False
        self.cut = False
        self._sock_lock = threading.Lock()  # guards _sock, _expired, _ended, cut
        self._sock: Any = None
        self._expired = False
        self._ended = False
        self._in_heap = True  # guarded by the owner's heap lock
        self._owner = owner

    @property
    def ended(self) -> bool:
        return self._ended

    def attach(self, sock: Any) -> None:
        """Watch ``sock`` (a newer socket of the same exchange replaces the older one)."""
        with self._sock_lock:
            if self._ended:
                return
            self._sock = sock
            if self._expired:  # the deadline passed before this socket existed
                self.cut = True
                _shutdown(sock)

    def end(self) -> bool:
        """Stop watching (idempotent); True when the socket was cut for the deadline."""
        with self._sock_lock:
            if self._ended:
                return self.cut
            self._ended = True
            self._sock = None
        self._owner._ended(self)
        return self.cut

    def _expire(self) -> None:
        # Runs on the watchdog's thread. The shutdown happens under this watch's own lock,
        # so once end() has returned, this socket (maybe pooled again) is never touched.
        with self._sock_lock:
            if self._ended:
                return
            self._expired = True
            if self._sock is not None:
                self.cut = True
                _shutdown(self._sock)


def _shutdown(sock: Any) -> None:
    raw = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)  # TLS-in-TLS wrapper
    if raw is None:
        return
    try:
        # socket.socket's own method: SSLSocket.shutdown would also drop its SSL object
        # under the feet of the thread blocked in a read on it.
        socket.socket.shutdown(raw, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: the blocked call fails on its own


class Watchdog:
    """The thread that cuts the sockets of expired watches. One per process (:func:`watch`).

    ``idle_exit_s``: how long the thread stays with no live watch before it ends (None:
    :data:`IDLE_EXIT_S`, read at each decision); the next registration starts another.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, idle_exit_s: Optional[float] = None) -> None:
        if idle_exit_s is not None and (isinstance(idle_exit_s, bool) or not isinstance(idle_exit_s, (int, float))
                                        or not math.isfinite(idle_exit_s) or idle_exit_s <= 0):
            raise ConfigError("idle_exit_s", idle_exit_s, "must be a finite number of seconds > 0, or None")
        self._clock = clock
        self._idle_exit_s = idle_exit_s
        self._heap_cond = threading.Condition(threading.Lock())
        self._heap: List[Tuple[float, int, Watch]] = []
        self._ended_in_heap = 0
        self._seq = itertools.count()
        # The thread watching the heap, None when it ended (or none started yet). Guarded by
        # the heap's lock: the thread clears it there as it decides to end, and a registration
        # checks it there, so a registration either is seen by the thread or starts a new one.
        self._thread: Optional[threading.Thread] = None
        forksafe.register(self, phase=forksafe.PHASE_THREADS)

    def watch(self, timeout_s: float) -> Watch:
        """A new watch expiring ``timeout_s`` seconds from now; call ``end()`` when done."""
        entry = Watch(self._clock() + timeout_s, self)
        with self._heap_cond:
            heapq.heappush(self._heap, (entry.deadline, next(self._seq), entry))
            if self._thread is None:
                self._start_thread()
            elif self._heap[0][2] is entry:  # earlier than what the thread waits for
                self._heap_cond.notify()
        return entry

    @property
    def running(self) -> bool:
        """Whether a thread watches the heap now (it ends after ``idle_exit_s`` with nothing to watch)."""
        with self._heap_cond:
            return self._thread is not None

    def pending(self) -> int:
        """Entries in the heap (live and not yet purged): for tests and stats."""
        with self._heap_cond:
            return len(self._heap)

    def _start_thread(self) -> None:
        # Under the heap's lock. Thread.start() returns once the thread runs; the thread then
        # waits for this lock, so it sees the registration that started it.
        thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread = thread
        try:
            thread.start()
        except BaseException as exc:
            # None again, so that the next registration tries: if start() was interrupted
            # after the thread began, that one only watches alongside (see _run's exit)
            self._thread = None
            if not isinstance(exc, RuntimeError):
                raise
            log.warning("the deadline watchdog thread could not start (%s): exchanges registered meanwhile are "
                        "bounded by their read timeouts until a later registration starts it", exc)

    def _ended(self, entry: Watch) -> None:
        with self._heap_cond:
            if not entry._in_heap:
                return
            self._ended_in_heap += 1
            if self._ended_in_heap >= _PURGE_MIN and 2 * self._ended_in_heap >= len(self._heap):
                live = [item for item in self._heap if not item[2].ended]
                for item in self._heap:
                    if item[2].ended:
                        item[2]._in_heap = False
                heapq.heapify(live)
                self._heap = live
                self._ended_in_heap = 0

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            self._watch_until_idle(me)
        except Exception:  # noqa: BLE001 - logged: a thread has no caller to raise to
            with self._heap_cond:
                if self._thread is me:
                    self._thread = None
            log.error("the deadline watchdog thread failed; the next registration starts another", exc_info=True)

    def _watch_until_idle(self, me: threading.Thread) -> None:
        idle_since: Optional[float] = None  # when the heap was first seen with nothing live in it
        while True:
            due: List[Watch] = []
            with self._heap_cond:
                while not due:
                    heap = self._heap
                    now = self._clock()
                    popped = False
                    while heap and (heap[0][2].ended or heap[0][0] <= now):
                        popped = True
                        entry = heapq.heappop(heap)[2]
                        entry._in_heap = False
                        if entry.ended:
                            self._ended_in_heap -= 1
                        else:
                            due.append(entry)
                    if due:
                        break
                    grace = IDLE_EXIT_S if self._idle_exit_s is None else self._idle_exit_s
                    if heap:  # a live watch: wake at its deadline, or after `grace` to see if all ended
                        idle_since = None
                        self._heap_cond.wait(min(heap[0][0] - now, grace))
                    elif popped or idle_since is None:  # nothing live since just now
                        idle_since = now
                        self._heap_cond.wait(grace)
                    elif now - idle_since < grace:
                        self._heap_cond.wait(idle_since + grace - now)
                    else:  # idle for `grace`: end, under this lock (see watch())
                        if self._thread is me:
                            self._thread = None
                        return
            for entry in due:  # outside the heap lock: registrations go on meanwhile
                entry._expire()

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._heap_cond = threading.Condition(threading.Lock())
        self._heap = []
        self._ended_in_heap = 0
        self._thread = None


_WATCHDOG = Watchdog()  # reset in a child after fork: it joined the fork registry (forksafe.py)


def watch(timeout_s: float) -> Watch:
    """Register an exchange that must end within ``timeout_s`` seconds (process-wide watchdog)."""
    return _WATCHDOG.watch(timeout_s)


# -- urllib3 glue: connections that hand their socket to the exchange's watch ----------------

_current = threading.local()  # .watch: the watch of the request this thread is sending


def set_current(entry: Optional[Watch]) -> None:
    """Make ``entry`` the watch of the request this thread sends next (None: none)."""
    _current.watch = entry


class _WatchedConnectionMixin:
    """Attaches each socket it makes or uses to the sending thread's current watch."""

    sock: Any
    _holysheep_watch: Optional[Watch] = None

    def _adopt(self, sock: Any = None) -> None:
        entry: Optional[Watch] = getattr(_current, "watch", None)
        if entry is None:
            return
        if self._holysheep_watch is not entry:
            if self._holysheep_watch is not None:
                self._end_watch()  # a previous exchange's watch; closes the socket if it was cut
            self._holysheep_watch = entry
        sock = self.sock if sock is None else sock
        if sock is not None:
            entry.attach(sock)

    def _end_watch(self) -> None:
        entry, self._holysheep_watch = self._holysheep_watch, None
        if entry is not None and entry.end():
            self.close()  # cut: never reuse this socket

    def _new_conn(self) -> Any:
        sock = super()._new_conn()  # type: ignore[misc]
        self._adopt(sock)  # the raw socket: covers a TLS handshake trickled byte by byte
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._adopt()  # after TLS, the wrapped socket replaces the raw one

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._adopt()  # a pooled connection: its socket already exists
        super().request(*args, **kwargs)  # type: ignore[misc]
        entry = self._holysheep_watch
        if entry is not None:
            entry.sent = True

    def close(self) -> None:
        entry, self._holysheep_watch = self._holysheep_watch, None
        if entry is not None:
            entry.end()
        super().close()  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchedConnectionMixin, _connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, _connection.HTTPSConnection):
    pass


class _PoolMixin:
    def _put_conn(self, conn: Any) -> None:
        # Back to the pool: the exchange is over, whatever the transport does next.
        end = getattr(conn, "_end_watch", None)
        if end is not None:
            end()
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPConnectionPool(_PoolMixin, _connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(_PoolMixin, _connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOL_CLASSES = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class TransportClosedError(RuntimeError):
    """Raised by a closed :class:`WatchedAdapter` instead of opening a connection."""


class WatchedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections obey the sending thread's watch, and which
    opens nothing once :attr:`closed` is set (pools created in a race with it are closed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closed = False
        super().__init__(*args, **kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is _poolmanager.pool_classes_by_scheme:  # not SOCKS's own
            manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        return self._checked(super().get_connection_with_tls_context(*args, **kwargs))

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:  # requests < 2.32.2
        return self._checked(super().get_connection(*args, **kwargs))

    def _checked(self, pool: Any) -> Any:
        if self.closed:  # close() ran before or while the pool was looked up (or created)
            pool.close()
            raise TransportClosedError("the client is closed")
        return pool
