"""Releasing several things when any step may be interrupted.

A ``KeyboardInterrupt`` or a worker's soft time limit can land inside any step of a
release (a hook, a clock read). Each thing a call holds (a node slot, a connection, a
spend reservation, a breaker permit) must still be given back exactly once, so the
steps of one release run independently: :func:`call_each` runs them all, then raises
the first error.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

__all__ = ["call_each", "discard"]


def call_each(calls: Iterable[Callable[[], Any]]) -> None:
    """Call every function in order, even when some raise; then raise the first error."""
    first: Optional[BaseException] = None
    for call in calls:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once every step ran
            if first is None:
                first = exc
    if first is not None:
        try:
            raise first
        finally:  # its traceback holds this frame: no local may hold the error back
            first = None


def discard(result: Any) -> None:
    """An answer nobody will read (its call was interrupted): close what it holds open
    (a stream, or an opened response), if anything."""
    for owner in (result, getattr(result, "response", None)):
        close = getattr(owner, "close", None)
        if callable(close):
            close()
            return
