"""Opt-in response cache for chat calls: a cachetools ``TTLCache`` behind one lock.

Only deterministic calls are cached by default (``temperature == 0``); a call may ask
with ``cache=True`` or refuse with ``cache=False``. The key is the SHA-256 of the
canonical JSON (sorted keys) of what decides the answer: the model, the messages, the
parameters, the call's region, and a fingerprint of the client's credentials and nodes.
One ``ResponseCache`` shared by several clients therefore serves an answer only to a
client with the same API key(s), node URLs and node headers; the fingerprint is a
keyed one-way hash (HMAC-SHA-256 with a secret drawn once per process), never the key. Errors are
never cached, nor is an answer that cannot be deep-copied (it is returned, with a
warning). Identical calls that arrive while the first one is in flight wait for it
instead of paying again; if it fails or its answer is not kept (a downgraded or
fallback answer), every waiter makes its own call at once, in parallel.

The lock guards the cache's dictionaries only; it is never held while the API is
called.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import queue
import secrets
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from cachetools import TTLCache

from . import forksafe
from .errors import AllAttemptsFailedError, ConfigError, InvalidRequestError
from .suggest import unknown_option

__all__ = ["ResponseCache", "cache_key", "credentials_fingerprint", "check_cache_option", "make_cache"]

log = logging.getLogger(__name__)

T = TypeVar("T")


# Keys the credentials' fingerprint: it means nothing outside this process (or its forks),
# so a fingerprint seen somewhere cannot be checked against guessed keys.
_FINGERPRINT_SECRET = secrets.token_bytes(32)


def credentials_fingerprint(nodes: Sequence[Any], api_key: Optional[str]) -> str:
    """A one-way fingerprint of what a client sends to whom: each node's id, URL, the key
    it gets (its own or the client's) and its extra headers. Never contains the key."""
    material = [[n.id, n.base_url, n.api_key or api_key or "", sorted(n.headers.items())] for n in nodes]
    text = json.dumps(material, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(_FINGERPRINT_SECRET, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def cache_key(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any], *,
              region: Optional[str] = None, scope: str = "") -> str:
    """SHA-256 of the canonical JSON of the call (same call, same key; any change, new key).

    ``scope`` is the client's :func:`credentials_fingerprint`; ``region`` the call's.
    Raises only :class:`InvalidRequestError` (a client validates its arguments first).
    """
    call = {"model": model, "messages": list(messages), "params": dict(params), "region": region, "scope": scope}
    try:
        data = json.dumps(call, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
        problem = None
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        problem = f"must be JSON-serialisable text ({type(exc).__name__})"
    if problem is not None:  # outside the except: the encoder's error would carry the arguments
        raise InvalidRequestError("params", type(params).__name__, problem)
    return hashlib.sha256(data).hexdigest()


class ResponseCache:
    """At most ``maxsize`` answers, each kept ``ttl_s`` seconds by ``timer`` (monotonic).

    Thread-safe. Values are deep-copied in and out, so a caller that edits its answer
    does not edit the cache.
    """

    def __init__(self, maxsize: int = 1024, ttl_s: float = 300.0, *,
                 timer: Callable[[], float] = time.monotonic) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigError("cache.maxsize", maxsize, "must be an integer >= 1")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ConfigError("cache.ttl_s", ttl_s, "must be a number of seconds > 0")
        self.maxsize = maxsize
        self.ttl_s = float(ttl_s)
        self._timer = timer
        self._entries_lock = threading.Lock()
        self._entries: TTLCache = TTLCache(maxsize=maxsize, ttl=self.ttl_s, timer=timer)
        self._pending: Dict[str, _Pending] = {}
        self._hits = 0
        self._misses = 0
        self._waits = 0
        self._stores = 0
        forksafe.register(self)

    def __repr__(self) -> str:
        return f"ResponseCache(maxsize={self.maxsize}, ttl_s={self.ttl_s:g})"

    @staticmethod
    def wanted(params: Mapping[str, Any], cache: Optional[bool]) -> bool:
        """Whether a call is cached: ``cache`` if given, else only when ``temperature == 0``."""
        if cache is not None:
            return cache
        return params.get("temperature") == 0

    def get_or_call(self, key: str, call: Callable[[], Tuple[T, bool]], *, wait_s: float) -> Tuple[T, bool]:
        """The cached value (``(value, True)``), or ``call()``'s (``(value, False)``).

        ``call`` returns ``(value, store)``; the value is kept only when ``store`` is
        True, and an exception is never kept. While one caller runs ``call`` for a key,
        others with the same key wait for its result, at most ``wait_s`` seconds: pass
        the time the caller has left (what remains of its deadline), since a waiter
        that gives up raises :class:`AllAttemptsFailedError`. A caller waits at most
        once: if that call fails or its value is not kept, every waiter runs ``call``
        itself straight away, all in parallel.
        """
        deadline = self._timer() + wait_s
        waited = False
        while True:
            with self._entries_lock:
                value = self._entries.get(key)
                if value is None:
                    pending = self._pending.get(key)
                    leader = pending is None
                    if leader:
                        pending = self._pending[key] = _Pending()
                        self._misses += 1
                    elif not waited:
                        self._waits += 1
                        wake: "queue.SimpleQueue[None]" = queue.SimpleQueue()
                        pending.waiters.append(wake)  # type: ignore[union-attr]
            if value is not None:
                copied = _copy(value)  # outside the lock: stored values are never changed
                with self._entries_lock:
                    if copied is not None:
                        self._hits += 1
                        return copied, True
                    if self._entries.get(key) is value:
                        del self._entries[key]  # cannot be handed out: forget it
                continue
            if leader:
                break
            if waited:  # the call waited for left nothing to share (or it vanished): no second wait
                return self._call_and_store(key, call), False
            remaining = deadline - self._timer()
            woken = remaining > 0
            if woken:
                try:
                    wake.get(timeout=remaining)
                except queue.Empty:
                    woken = False
            if not woken:
                raise AllAttemptsFailedError("deadline exceeded while waiting for an identical call in flight", ())
            waited = True
            if not pending.stored:  # type: ignore[union-attr]
                return self._call_and_store(key, call), False
        assert pending is not None  # the leader always made one
        kept = None
        try:
            value, store = call()
            if store:
                kept = _copy(value)
        finally:
            self._finish(key, pending, kept)  # always: waiters must never wait for nothing
        return value, False

    def _call_and_store(self, key: str, call: Callable[[], Tuple[T, bool]]) -> T:
        """A waiter's own call, after the one it waited for shared nothing: keeps its value if it may."""
        value, store = call()
        kept = _copy(value) if store else None
        if kept is not None:
            with self._entries_lock:
                self._entries[key] = kept
                self._stores += 1
        return value

    def _finish(self, key: str, pending: _Pending, value: Any) -> None:
        waiters: List["queue.SimpleQueue[None]"] = []
        try:
            with self._entries_lock:
                # first: storing reads the timer, and an interrupt there must not leave
                # the key pending (identical calls would wait for a call that is gone)
                del self._pending[key]
                waiters, pending.waiters = pending.waiters, []
                if value is not None:
                    self._entries[key] = value
                    self._stores += 1
                    pending.stored = True
        finally:
            for wake in waiters:  # every waiter at once
                wake.put(None)

    def clear(self) -> None:
        with self._entries_lock:
            self._entries.clear()

    def stats(self) -> Dict[str, Any]:
        """Hits, misses, waits (calls that waited for an identical one), stores and size."""
        with self._entries_lock:
            self._entries.expire()
            return {"hits": self._hits, "misses": self._misses, "waits": self._waits, "stores": self._stores,
                    "size": len(self._entries), "maxsize": self.maxsize, "ttl_s": self.ttl_s}

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """In a child after fork: fresh lock; the parent's in-flight calls are not ours."""
        self._entries_lock = threading.Lock()
        self._pending = {}


class _Pending:
    """One key's call in flight; ``stored`` (set before waking anyone) if its value was kept.

    Each waiter sleeps on a queue of its own, woken when the call ends. C-level queues,
    not an Event: an Event's Python-level Condition can be left holding its lock by an
    interrupted waiter (KeyboardInterrupt), which would hang the call that wakes them.
    """

    __slots__ = ("stored", "waiters")

    def __init__(self) -> None:
        self.stored = False
        self.waiters: List["queue.SimpleQueue[None]"] = []


def _copy(value: Any) -> Any:
    """A deep copy of ``value``, or None when it cannot be copied (it is then not cached)."""
    try:
        return copy.deepcopy(value)
    except Exception as exc:  # RecursionError (deep JSON), TypeError (uncopyable objects), ...
        log.warning("response not cached: it cannot be copied (%s: %s)", type(exc).__name__, exc)
        return None


def check_cache_option(value: Any) -> Any:
    """Validate ``Client(cache=...)``: None/False, True, a dict of options, or a ResponseCache."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, ResponseCache):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"maxsize", "ttl_s"}, key=repr)
        if unknown:
            raise unknown_option("cache", unknown[0], ("maxsize", "ttl_s"), what="cache option")
        ResponseCache(**value)  # validates
        return dict(value)
    raise ConfigError("cache", value, "must be None, True, {'maxsize': n, 'ttl_s': s} or a ResponseCache")


def make_cache(option: Any, *, timer: Callable[[], float]) -> Optional[ResponseCache]:
    """The cache a Client uses for a validated ``cache`` option (a dict gets the client's clock)."""
    if option is None or isinstance(option, ResponseCache):
        return option
    return ResponseCache(**option, timer=timer)
