"""Circuit breakers per model (and optionally per node), on pybreaker's state machine.

pybreaker's ``CircuitBreaker.call()`` holds the breaker's lock for the whole wrapped
call, so routing HTTP requests through it would let one thread at a time use a model.
Here a call takes a :class:`Permit` first (microseconds under the breaker's own lock),
sends with no lock held, and records its outcome on the permit afterwards. State,
counters and the time it opened live in a pybreaker ``CircuitBreakerStorage`` (memory
by default; ``Client(breaker_storage=...)`` may supply a process-shared one), and every
transition goes through pybreaker's ``open``/``half_open``/``close``, so its listeners
(ours feed logging and stats) see them.

* **closed**: calls go through; ``fail_max`` system failures in a row open it.
* **open**: calls fail fast with :class:`~holysheep_lb.errors.CircuitOpenError`, which
  says when to retry, for ``trial_interval_s`` (default ``min(reset_timeout_s, 10)``;
  see :attr:`~holysheep_lb.config.BreakerSettings.open_s`), the first time too.
* **half-open**: up to ``success_threshold`` trial calls at a time (per process), each
  one attempt; ``success_threshold`` successful trials close it, one failed trial opens
  it again for another trial interval. A trial is a single attempt, so probing a model
  that is down costs one request per interval, and a recovered model gets traffic back
  within one interval plus the gap between calls.

Only system failures count: a call whose attempts failed with 5xx, timeouts, connection
errors or invalid answers. A 4xx means the model answered, so it counts as a success
(pybreaker's ``exclude`` rule); 429s, calls that got no answer and calls whose retries
the retry budget refused count as nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import pybreaker

from . import forksafe
from .config import BreakerSettings
from .errors import CircuitOpenError
from .policy.classify import breaker_verdict

__all__ = ["Breaker", "BreakerBoard", "Permit", "StorageFactory", "stream_outcome_hook", "verdict", "wall_clock"]

log = logging.getLogger(__name__)

StorageFactory = Callable[[str], pybreaker.CircuitBreakerStorage]

# Model names come from callers; idle closed breakers beyond this many are forgotten.
_MAX_BREAKERS = 1024  # model names come from callers: memory stays bounded
_STORAGE_WARN_INTERVAL_S = 60.0
# Open times round-trip through datetime (microseconds) at epoch magnitudes.
_CLOCK_SLACK_S = 1e-3


def wall_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock`` (monotonic, maybe fake) shifted to read like ``time.time()``.

    Breakers stamp their open time in seconds since the epoch, so that a shared storage
    means the same to every process, yet tests move them with the client's fake clock.
    """
    offset = time.time() - clock()
    return lambda: offset + clock()


def verdict(error: Optional[BaseException]) -> str:
    """How a call's outcome counts for a breaker: "success", "failure" or "none"
    (:func:`holysheep_lb.policy.classify.classify` decides)."""
    return breaker_verdict(error)


class Permit:
    """Leave to make one call through a breaker; record its outcome exactly once."""

    __slots__ = ("_breaker", "_trial", "_done")

    def __init__(self, breaker: Optional["Breaker"], trial: bool) -> None:
        self._breaker = breaker
        self._trial = trial
        self._done = breaker is None

    @property
    def trial(self) -> bool:
        """Whether this is a half-open breaker's trial call (let exactly one attempt through)."""
        return self._trial

    def record(self, error: Optional[BaseException] = None) -> None:
        """The call ended: ``error`` is None on success, else the exception it raised."""
        if not self._done:
            self._done = True
            self._breaker._record(verdict(error), self._trial)  # type: ignore[union-attr]

    def release(self) -> None:
        """The call ended without telling anything about the model (nothing was sent)."""
        if not self._done:
            self._done = True
            self._breaker._record("none", self._trial)  # type: ignore[union-attr]


NO_PERMIT = Permit(None, False)


def stream_outcome_hook(permit: Permit) -> Callable[[str, Optional[BaseException]], None]:
    """Record a stream's outcome into its permit when the stream ends, not at its first
    chunk: a model whose streams keep breaking must trip its breaker."""
    def record(status: str, error: Optional[BaseException]) -> None:
        if status == "cancelled":  # the caller stopped reading: says nothing about the model
            permit.release()
        else:
            permit.record(error if status == "interrupted" else None)
    return record


class Breaker:
    """One circuit breaker. Thread-safe; ``_state_lock`` guards its bookkeeping only.

    With a shared storage the bookkeeping reads and writes that storage under the lock
    (pybreaker's own ``call()`` does the same); the request itself never runs under it.
    """

    def __init__(self, name: str, settings: BreakerSettings, storage: pybreaker.CircuitBreakerStorage,
                 *, clock: Callable[[], float], listeners: Iterable[pybreaker.CircuitBreakerListener],
                 board: Optional["BreakerBoard"] = None) -> None:
        self.name = name
        self._board = board
        self.settings = settings
        self._storage = storage
        self._clock = clock
        self._listeners = list(listeners)
        self._state_lock = threading.Lock()
        self._trials = 0  # half-open trial calls in flight in this process
        self._cb = self._new_breaker()
        forksafe.register(self)

    def _new_breaker(self) -> pybreaker.CircuitBreaker:
        s = self.settings
        # pybreaker's reset_timeout is how long each open lasts (its listeners, our log line, read it)
        return pybreaker.CircuitBreaker(
            fail_max=s.fail_max, reset_timeout=s.open_s, success_threshold=s.success_threshold,
            state_storage=self._storage, listeners=self._listeners, name=self.name,
            throw_new_error_on_trip=False,
        )

    def __repr__(self) -> str:
        return f"<Breaker {self.name} {self._storage.state}>"

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """Fresh locks; the parent's trial calls do not exist here."""
        self._state_lock = threading.Lock()
        self._trials = 0
        self._cb = self._new_breaker()

    # -- state ------------------------------------------------------------------------

    def _state(self) -> str:
        # pybreaker's ``state`` re-reads the storage and notifies listeners of a change
        # made elsewhere (another process sharing the storage).
        return self._cb.state.name

    def _open_for_s(self, now: float) -> float:
        """Seconds until an open breaker lets a trial through (<= 0: now)."""
        opened_at = self._storage.opened_at
        if opened_at is None:
            return 0.0
        if opened_at.tzinfo is None:
            opened_at = opened_at.replace(tzinfo=timezone.utc)
        wait_s = opened_at.timestamp() + self.settings.reset_timeout_s - now
        return wait_s if wait_s > _CLOCK_SLACK_S else 0.0

    def _trip(self) -> None:
        self._cb.open()
        # pybreaker stamps datetime.now(); use our (injectable) clock instead. Each open lasts
        # settings.open_s: stamped as if it had opened reset_timeout_s - open_s earlier, so that
        # every process sharing the storage reads "open until opened_at + reset_timeout_s" alike.
        backdate_s = self.settings.reset_timeout_s - self.settings.open_s
        self._storage.opened_at = datetime.fromtimestamp(self._clock() - backdate_s, timezone.utc)

    def admit(self) -> Permit:
        """A permit for one call, or :class:`CircuitOpenError` saying when to retry.

        If the breaker's storage fails (a shared store that is down), the call is let
        through (fail open) and the failure is logged once per interval.
        """
        try:
            with self._state_lock:
                state = self._state()
                if state == pybreaker.STATE_OPEN:
                    wait_s = self._open_for_s(self._clock())
                    if wait_s > 0:
                        raise CircuitOpenError(self.name, wait_s)
                    self._cb.half_open()
                    state = pybreaker.STATE_HALF_OPEN
                if state == pybreaker.STATE_HALF_OPEN:
                    if self._trials >= self.settings.success_threshold:
                        raise CircuitOpenError(self.name, 0.0, f"half-open, {self._trials} trial call(s) in flight")
                    self._trials += 1
                    return Permit(self, trial=True)
                return Permit(self, trial=False)
        except CircuitOpenError:
            raise
        except Exception as exc:  # noqa: BLE001 - recovered: fail open, reported by the board
            self._storage_failed(exc)
            return NO_PERMIT
        finally:
            self._unlocked()

    def allows(self) -> bool:
        """Whether :meth:`admit` would let a call through now (changes nothing)."""
        try:
            with self._state_lock:
                state = self._state()
                if state == pybreaker.STATE_OPEN:
                    return self._open_for_s(self._clock()) <= 0
                if state == pybreaker.STATE_HALF_OPEN:
                    return self._trials < self.settings.success_threshold
                return True
        except Exception as exc:  # noqa: BLE001 - recovered: fail open, reported by the board
            self._storage_failed(exc)
            return True
        finally:
            self._unlocked()

    def _record(self, outcome: str, trial: bool) -> None:
        try:
            with self._state_lock:
                if trial:
                    self._trials -= 1
                if outcome == "none":
                    return
                state = self._state()
                storage = self._storage
                if outcome == "failure":
                    storage.increment_counter()
                    if state == pybreaker.STATE_HALF_OPEN and trial:
                        self._trip()
                    elif state == pybreaker.STATE_CLOSED and storage.counter >= self.settings.fail_max:
                        self._trip()
                    return
                storage.reset_counter()
                # Only trial calls decide a half-open breaker: a slow call admitted before it
                # opened says nothing about the model now.
                if state == pybreaker.STATE_HALF_OPEN and trial:
                    storage.increment_success_counter()
                    if storage.success_counter >= self.settings.success_threshold:
                        self._cb.close()
        except Exception as exc:  # noqa: BLE001 - the call's own outcome stands; reported
            self._storage_failed(exc)
        finally:
            self._unlocked()

    def _storage_failed(self, exc: BaseException) -> None:
        if self._board is not None:
            self._board.storage_failed(self.name, exc)

    def _unlocked(self) -> None:
        # pybreaker calls our listener under its locks: its log lines are written here
        if self._board is not None:
            self._board.flush_logs()

    def idle(self) -> bool:
        """Closed with no failure counted and no call in flight: safe to forget."""
        try:
            with self._state_lock:
                return (self._trials == 0 and self._storage.state == pybreaker.STATE_CLOSED
                        and self._storage.counter == 0)
        except Exception:  # noqa: BLE001 - unknown state: keep it
            return False

    def snapshot(self) -> Dict[str, Any]:
        """State and counters; ``retry_after_s`` is when an open breaker lets a trial through."""
        base = {"name": self.name, "fail_max": self.settings.fail_max,
                "reset_timeout_s": self.settings.reset_timeout_s,
                "success_threshold": self.settings.success_threshold}
        try:
            with self._state_lock:
                state = self._state()
                wait_s = max(0.0, self._open_for_s(self._clock())) if state == pybreaker.STATE_OPEN else None
                return {
                    **base,
                    "state": state,
                    "failures": self._storage.counter,
                    "successes": self._storage.success_counter,
                    "trials_in_flight": self._trials,
                    "retry_after_s": None if wait_s is None else round(wait_s, 3),
                }
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            self._storage_failed(exc)
            return {**base, "state": "unknown", "failures": None, "successes": None,
                    "trials_in_flight": self._trials, "retry_after_s": None,
                    "error": f"{type(exc).__name__}: {exc}"[:200]}
        finally:
            self._unlocked()


class _TransitionListener(pybreaker.CircuitBreakerListener):
    """Logs each transition and counts it for ``Client.stats()``."""

    def __init__(self, board: "BreakerBoard") -> None:
        self._board = board

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        # Called under pybreaker's and our breaker's locks: count and queue the log line;
        # the breaker writes it once its locks are released.
        old = getattr(old_state, "name", None)
        new = new_state.name
        if new == pybreaker.STATE_OPEN:
            line = (logging.WARNING, "circuit breaker %s opened (was %s) for %.1f s",
                    (cb.name, old, cb.reset_timeout))
        else:
            line = (logging.INFO, "circuit breaker %s: %s -> %s", (cb.name, old, new))
        self._board._count_transition(new, line)


class BreakerBoard:
    """The client's breakers: one per model, and one per node when enabled. Thread-safe.

    ``model_settings`` applies to every model not in ``per_model`` (None: only the
    models in ``per_model`` get a breaker); ``node_settings`` None means no node
    breakers. ``storage_factory(name)`` builds each breaker's storage; ``clock`` is a
    wall clock in seconds (shared storages compare open times across processes).
    """

    def __init__(self, *, model_settings: Optional[BreakerSettings] = BreakerSettings(),
                 per_model: Optional[Mapping[str, BreakerSettings]] = None,
                 node_settings: Optional[BreakerSettings] = None,
                 storage_factory: Optional[StorageFactory] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._model_settings = model_settings
        self._per_model = dict(per_model or {})
        self._node_settings = node_settings
        self._storage_factory = storage_factory
        self._clock = clock
        self._listener = _TransitionListener(self)
        self._breakers_lock = threading.Lock()
        self._breakers: Dict[str, Breaker] = {}
        self._full_warned = False
        self._counts_lock = threading.Lock()
        self._transitions: Counter = Counter()
        self._pending_logs: List[Tuple[int, str, Tuple[Any, ...]]] = []
        self._last_storage_warning = float("-inf")
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._breakers_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        for breaker in list(self._breakers.values()):
            breaker.reset_after_fork()

    def _settings(self, kind: str, key: str) -> Optional[BreakerSettings]:
        if kind == "model":
            return self._per_model.get(key, self._model_settings)
        return self._node_settings

    def get(self, kind: str, key: str) -> Optional[Breaker]:
        """The breaker of a model (``kind="model"``) or node (``"node"``); None when off."""
        name = f"{kind}:{key}"
        with self._breakers_lock:
            breaker = self._breakers.get(name)
        if breaker is not None:
            return breaker
        settings = self._settings(kind, key)
        if settings is None:
            return None
        # built outside the lock: a shared storage may talk to its server here
        try:  # pybreaker reads the storage as soon as the breaker is built
            storage = (self._storage_factory(name) if self._storage_factory is not None
                       else pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED))
            new = Breaker(name, settings, storage, clock=self._clock, listeners=[self._listener], board=self)
        except Exception as exc:  # noqa: BLE001 - recovered: no breaker for now, reported
            self.storage_failed(name, exc)
            self.flush_logs()
            return None
        with self._breakers_lock:
            if name not in self._breakers and len(self._breakers) >= _MAX_BREAKERS:
                if self._storage_factory is not None or not self._forget_one_idle():
                    # Full, and nothing can be forgotten without talking to a shared
                    # store under this lock: this name goes unguarded, said once.
                    full_warning = not self._full_warned
                    self._full_warned = True
                    result: Optional[Breaker] = None
                else:
                    full_warning = False
                    result = self._breakers.setdefault(name, new)
            else:
                full_warning = False
                result = self._breakers.setdefault(name, new)
        if full_warning:
            log.warning("%d circuit breakers exist; %s and further new names get none", _MAX_BREAKERS, name)
        return result

    def _forget_one_idle(self) -> bool:
        """Forget one idle in-memory breaker (called under ``_breakers_lock``; no I/O)."""
        for name, breaker in self._breakers.items():
            if breaker.idle():
                del self._breakers[name]
                return True
        return False

    def admit(self, kind: str, key: Optional[str]) -> Permit:
        """A permit for one call, or :class:`CircuitOpenError`; a no-op permit when off."""
        breaker = self.get(kind, key) if key is not None else None
        return NO_PERMIT if breaker is None else breaker.admit()

    def allows(self, kind: str, key: Optional[str]) -> bool:
        """Whether a call would be let through now. Creates no breaker unless its state
        may live in a shared storage."""
        if key is None:
            return True
        if self._storage_factory is None:
            with self._breakers_lock:
                breaker = self._breakers.get(f"{kind}:{key}")
        else:
            breaker = self.get(kind, key)
        return True if breaker is None else breaker.allows()

    @property
    def nodes_enabled(self) -> bool:
        return self._node_settings is not None

    def _count_transition(self, new_state: str, line: Tuple[int, str, Tuple[Any, ...]]) -> None:
        with self._counts_lock:
            self._transitions[new_state] += 1
            if len(self._pending_logs) < 256:
                self._pending_logs.append(line)

    def flush_logs(self) -> None:
        """Write queued transition log lines; called with no breaker lock held."""
        if not self._pending_logs:
            return
        with self._counts_lock:
            lines, self._pending_logs = self._pending_logs, []
        for level, msg, args in lines:
            log.log(level, msg, *args)

    def storage_failed(self, name: str, exc: BaseException) -> None:
        """A breaker's storage raised: count it; warn at most once per interval."""
        now = time.monotonic()
        with self._counts_lock:
            self._transitions["storage_errors"] += 1
            warn = now - self._last_storage_warning >= _STORAGE_WARN_INTERVAL_S
            if warn:
                self._last_storage_warning = now
        if warn:
            log.warning("circuit breaker %s: its storage failed (%s: %s); letting calls through "
                        "(further storage errors are counted, not logged, for %.0f s)",
                        name, type(exc).__name__, str(exc)[:200], _STORAGE_WARN_INTERVAL_S)

    def snapshot(self) -> List[Dict[str, Any]]:
        with self._breakers_lock:
            breakers = list(self._breakers.values())
        return [b.snapshot() for b in breakers]

    def stats(self) -> Dict[str, int]:
        """How often breakers opened, went half-open and closed; how many are open now."""
        snaps = self.snapshot()
        with self._counts_lock:
            counts = dict(self._transitions)
        return {
            "opened": counts.get(pybreaker.STATE_OPEN, 0),
            "half_opened": counts.get(pybreaker.STATE_HALF_OPEN, 0),
            "closed": counts.get(pybreaker.STATE_CLOSED, 0),
            "storage_errors": counts.get("storage_errors", 0),
            "open_now": sum(1 for s in snaps if s["state"] == pybreaker.STATE_OPEN),
            "half_open_now": sum(1 for s in snaps if s["state"] == pybreaker.STATE_HALF_OPEN),
        }
