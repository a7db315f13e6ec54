"""The Redis client, whether it can be used, and how long one operation may wait for it.

Every Redis operation of the shared state goes through :meth:`RedisLink.call`. Whatever
goes wrong in there (redis-py raises, the server answers late, or answers something the
scripts never return) counts as Redis failing: the caller gets :class:`Unreachable`,
and later callers skip Redis for ``retry_interval_s``, so only one of them at a time
pays for a sick Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, TypeVar

import redis
import redis.connection

from ... import forksafe
from ...errors import SharedStateUnavailableError

__all__ = ["CONNECTION_CLASSES", "RedisLink", "UnexpectedAnswer", "Unreachable", "answer_float", "answer_int",
           "answer_list", "answer_text", "log"]

# One logger for the whole package: the name users already configure.
log = logging.getLogger("holysheep_lb.contrib.redis")

T = TypeVar("T")

# An answer slower than this share of the operation's budget is slow; this many slow
# answers in a row mark Redis as degraded, like a failure.
_SLOW_FRACTION = 0.5
_SLOW_STRIKES = 3
_MIN_WAIT_S = 0.001  # a socket timeout of 0 would mean "never block", not "give up now"


class Unreachable(Exception):
    """Redis could not be used for one operation. Never leaves this package."""


class UnexpectedAnswer(Exception):
    """Redis answered something its commands and our scripts never return."""

    def __init__(self, what: str, value: Any) -> None:
        text = repr(value)
        super().__init__(f"unexpected answer to {what}: {text if len(text) <= 60 else text[:57] + '...'}")


# -- checking answers -------------------------------------------------------------------------
# A bool is an int to Python, and not a number Redis ever sends.


def answer_list(value: Any, length: Optional[int], what: str) -> List[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise UnexpectedAnswer(what, value)
    return value


def answer_int(value: Any, what: str, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bytes) and 0 < len(value) <= 24:
        try:
            number = int(value)
        except ValueError:
            raise UnexpectedAnswer(what, value) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise UnexpectedAnswer(what, value)
    if minimum is not None and number < minimum:
        raise UnexpectedAnswer(what, value)
    return number


def answer_float(value: Any, what: str) -> float:
    if isinstance(value, bytes) and 0 < len(value) <= 32:
        try:
            number = float(value)
        except ValueError:
            raise UnexpectedAnswer(what, value) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise UnexpectedAnswer(what, value)
    if not math.isfinite(number):
        raise UnexpectedAnswer(what, value)
    return number


def answer_text(value: Any, what: str) -> str:
    if not isinstance(value, bytes):
        raise UnexpectedAnswer(what, value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UnexpectedAnswer(what, value) from None


# -- one operation's deadline, on the socket ----------------------------------------------------

_operation = threading.local()  # .deadline: time.monotonic() when this thread's operation gives up


def _time_left_s() -> Optional[float]:
    deadline = getattr(_operation, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def _bounded(left_s: float, configured_s: Optional[float]) -> float:
    left_s = max(_MIN_WAIT_S, left_s)
    return left_s if configured_s is None else min(left_s, configured_s)


class _OperationDeadline:
    """Mixed into redis-py's connections of a client made from a URL: inside a shared-state
    operation, connecting and each read wait no longer than the operation has left.

    redis-py has one socket timeout for everything; without this a Redis answering each
    command just under it would hold every call for several of them.
    """

    socket_connect_timeout: Optional[float]
    socket_timeout: Optional[float]
    _sock: Any

    def _connect(self) -> Any:
        left_s = _time_left_s()
        if left_s is None:
            return super()._connect()  # type: ignore[misc]
        configured = self.socket_connect_timeout
        self.socket_connect_timeout = _bounded(left_s, configured)
        try:
            return super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = configured

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        left_s, sock = _time_left_s(), self._sock
        if left_s is None or sock is None:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        sock.settimeout(_bounded(left_s, self.socket_timeout))
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._sock is sock:  # a timeout disconnects: then there is nothing to restore
                sock.settimeout(self.socket_timeout)


class _Connection(_OperationDeadline, redis.connection.Connection):
    pass


class _SSLConnection(_OperationDeadline, redis.connection.SSLConnection):
    pass


class _UnixConnection(_OperationDeadline, redis.connection.UnixDomainSocketConnection):
    pass


#: URL scheme -> the connection class of a client made from it
CONNECTION_CLASSES: Dict[str, type] = {"redis": _Connection, "rediss": _SSLConnection, "unix": _UnixConnection}


# -- the link -----------------------------------------------------------------------------------


class RedisLink:
    """The Redis client, and whether it is usable. Thread-safe.

    :meth:`call` runs ``fn(client)`` within a budget (``op_timeout_s``). When it raises,
    when the answer comes after the budget, or when ``_SLOW_STRIKES`` answers in a row
    take more than half of it, Redis is marked down (one warning per
    ``warn_interval_s``); for ``retry_interval_s`` afterwards :meth:`call` raises
    :class:`Unreachable` at once without trying, then lets one caller probe again.
    """

    def __init__(self, client: Any, *, fail_open: bool, warn_interval_s: float, retry_interval_s: float,
                 op_timeout_s: float, report_timeout_s: float, clock: Callable[[], float]) -> None:
        self.client = client
        self.fail_open = fail_open
        self.op_timeout_s = op_timeout_s
        self.report_timeout_s = report_timeout_s  # for reports, which read more than a call does
        self._warn_interval_s = warn_interval_s
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._health_lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._retry_at = 0.0
        self._warned_at: Optional[float] = None
        self._unwarned_failures = 0
        self._failures = 0
        self._outages = 0
        self._slow_answers = 0
        self._slow_in_a_row = 0
        self._last_problem = ""
        forksafe.register(self, phase=forksafe.PHASE_CONNECTIONS)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._health_lock = threading.Lock()

    @property
    def reachable(self) -> bool:
        """False from a failure until the next command that succeeds in time."""
        return self._down_since is None

    def call(self, fn: Callable[[Any], T], *, budget_s: Optional[float] = None) -> T:
        """``fn(client)``, its answers checked by ``fn``; :class:`Unreachable` when Redis failed."""
        if self._down_since is not None and not self._claim_probe():
            raise Unreachable()
        budget_s = self.op_timeout_s if budget_s is None else budget_s
        started = self._clock()
        _operation.deadline = time.monotonic() + budget_s
        try:
            result = fn(self.client)
        except Exception as exc:
            self._failed(_problem(exc))
            raise Unreachable() from exc
        finally:
            _operation.deadline = None
        self._answered(self._clock() - started, budget_s)
        return result

    def unavailable(self, what: str, exc: Unreachable) -> SharedStateUnavailableError:
        """The fail-closed error for ``what``, saying why."""
        cause = exc.__cause__
        detail = (f"{type(cause).__name__}: {cause}" if cause is not None
                  else f"{self._last_problem}, less than {self._retry_interval_s:g} s ago")
        return SharedStateUnavailableError(what, detail)

    def status(self) -> Dict[str, Any]:
        with self._health_lock:
            down = self._down_since
            return {
                "reachable": down is None,
                "down_for_s": None if down is None else round(self._clock() - down, 3),
                "failures": self._failures,
                "outages": self._outages,
                "slow_answers": self._slow_answers,
                "fail_open": self.fail_open,
            }

    # -- bookkeeping (under _health_lock, microseconds; logging after it) -----------------------

    def _claim_probe(self) -> bool:
        with self._health_lock:
            if self._down_since is None:
                return True
            now = self._clock()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._retry_interval_s
            return True

    def _answered(self, took_s: float, budget_s: float) -> None:
        """An answer came: fast is well (and ends an outage), slow counts against Redis."""
        with self._health_lock:
            if took_s <= budget_s * _SLOW_FRACTION:
                self._slow_in_a_row = 0
                if self._down_since is None:
                    return
                down_s, self._down_since = self._clock() - self._down_since, None
                recovered = True
            else:
                self._slow_answers += 1
                self._slow_in_a_row += 1
                # a late probe keeps Redis down; otherwise one late answer, or a few slow ones
                if self._down_since is None and took_s <= budget_s and self._slow_in_a_row < _SLOW_STRIKES:
                    return
                recovered = False
        if recovered:
            log.info("shared state: Redis is reachable again after %.1f s", down_s)
            return
        if took_s > budget_s:
            self._failed(f"Redis is too slow (an answer took {took_s:.3g} s, over the {budget_s:g} s budget)")
        else:
            self._failed(f"Redis is too slow ({self._slow_in_a_row} answers in a row took over "
                         f"{budget_s * _SLOW_FRACTION:.3g} s, the last {took_s:.3g} s)")

    def _failed(self, problem: str) -> None:
        with self._health_lock:
            now = self._clock()
            self._failures += 1
            self._unwarned_failures += 1
            self._slow_in_a_row = 0
            self._last_problem = problem
            if self._down_since is None:
                self._down_since = now
                self._outages += 1
            self._retry_at = now + self._retry_interval_s
            if self._warned_at is not None and now - self._warned_at < self._warn_interval_s:
                return
            self._warned_at = now
            failures, self._unwarned_failures = self._unwarned_failures, 0
        consequence = ("each process uses its own in-memory breakers, rate limits and budgets until it is back"
                       if self.fail_open else "calls are refused until it is back (fail_open=False)")
        log.warning("shared state: %s; %s. %d failure(s) since the last warning; retrying every %g s; "
                    "this warning repeats at most every %g s",
                    problem, consequence, failures, self._retry_interval_s, self._warn_interval_s)


def _problem(exc: Exception) -> str:
    """What went wrong, for the warning: unreachable, too slow, an error, or an odd answer."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return f"Redis is too slow ({text})"
    if isinstance(exc, (redis.ConnectionError, OSError)):
        return f"Redis is unreachable ({text})"
    if isinstance(exc, redis.RedisError):
        return f"Redis answered with an error ({text})"
    return f"Redis gave an unexpected answer ({text})"
