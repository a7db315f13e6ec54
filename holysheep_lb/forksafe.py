"""The one fork registry: objects holding locks, threads or sockets join it when built, and a
child process resets each one that is still alive, right after ``os.fork()``.

A lock another thread held at the fork stays held forever in the child, the parent's
threads do not exist there, and a pooled socket must not be shared by two processes.
So a class that holds any of them::

    class Bucket:
        def __init__(self) -> None:
            self._tokens_lock = threading.Lock()
            forksafe.register(self)

        @forksafe.once_per_process
        def reset_after_fork(self) -> None:
            self._tokens_lock = threading.Lock()

The registry keeps weak references (it keeps nothing alive, and a collected object is not
reset) and calls ``reset_after_fork()`` in the child in a defined order: every object of
:data:`PHASE_STATE` (locks, counters, reservations), then :data:`PHASE_CONNECTIONS`
(HTTP sessions, Redis links), then :data:`PHASE_THREADS` (thread handles, restarted
lazily), each phase in the order the objects joined. A reset that fails is logged with its
traceback and the others still run (a fork handler has no caller to raise to).

:func:`once_per_process` makes a reset idempotent: a second call in the same process (the
owner resetting its parts, or a hand-wired hook running after the registry) does nothing.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, TypeVar

__all__ = ["ForkSafe", "PHASE_STATE", "PHASE_CONNECTIONS", "PHASE_THREADS", "register", "once_per_process",
           "live_objects"]

log = logging.getLogger(__name__)

PHASE_STATE = 0
PHASE_CONNECTIONS = 1
PHASE_THREADS = 2
_PHASES = (PHASE_STATE, PHASE_CONNECTIONS, PHASE_THREADS)
_MIN_PRUNE_AT = 64  # entries of collected objects are dropped when the table doubles past this


class ForkSafe(Protocol):
    """What the registry needs from a member."""

    def reset_after_fork(self) -> None: ...


class _Entry:
    __slots__ = ("ref", "phase", "seq", "reset_pid")

    def __init__(self, ref: "weakref.ref[Any]", phase: int, seq: int) -> None:
        self.ref = ref
        self.phase = phase
        self.seq = seq
        self.reset_pid: Optional[int] = None  # the process this object was last reset in


_registry_lock = threading.Lock()  # guards _entries and _prune_at: bookkeeping only
_entries: Dict[int, _Entry] = {}  # id(object) -> entry; a reused id replaces a collected object's entry
_prune_at = _MIN_PRUNE_AT
_seq = itertools.count()


def register(obj: ForkSafe, *, phase: int = PHASE_STATE) -> None:
    """Reset ``obj`` (``obj.reset_after_fork()``) in every child forked while it is alive."""
    global _prune_at
    if phase not in _PHASES:
        raise ValueError(f"phase must be one of {_PHASES}, got {phase!r}")
    if not callable(getattr(obj, "reset_after_fork", None)):
        raise TypeError(f"{type(obj).__name__} has no reset_after_fork() to call after fork")
    entry = _Entry(weakref.ref(obj), phase, next(_seq))
    with _registry_lock:
        _entries[id(obj)] = entry
        if len(_entries) > _prune_at:
            for key in [key for key, e in _entries.items() if e.ref() is None]:
                del _entries[key]
            _prune_at = max(_MIN_PRUNE_AT, 2 * len(_entries))


def live_objects() -> List[Any]:
    """The registered objects still alive, in reset order."""
    with _registry_lock:
        entries = sorted(_entries.values(), key=lambda e: (e.phase, e.seq))
    return [obj for obj in (e.ref() for e in entries) if obj is not None]


def _entry_of(obj: object) -> Optional[_Entry]:
    entry = _entries.get(id(obj))
    return entry if entry is not None and entry.ref() is obj else None


F = TypeVar("F", bound=Callable[[Any], None])


def once_per_process(reset: F) -> F:
    """Decorate ``reset_after_fork`` so that it runs at most once in each process.

    Only for registered objects (others are reset on every call, as without it)."""

    @functools.wraps(reset)
    def guarded(self: Any) -> None:
        entry = _entry_of(self)
        if entry is not None:
            pid = os.getpid()
            if entry.reset_pid == pid:
                return
            entry.reset_pid = pid
        reset(self)

    return guarded  # type: ignore[return-value]


def _before_fork() -> None:
    _registry_lock.acquire()  # no registration half done in the child's copy


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # the parent's is held (by _before_fork); only ours is left here
    for obj in live_objects():
        try:
            obj.reset_after_fork()
        except Exception:
            log.error("after fork: resetting %s failed; it may not work in this process",
                      type(obj).__name__, exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
