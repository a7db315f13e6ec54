"""When a node counts as hung, and the thread that watches for it while calls wait.

A node *hangs* when it stops answering while requests wait on it: Finagle's peak-EWMA
assumes answers arrive, and a node that accepts connections and never answers gives it
no sample at all. So ``NodeState.check_hung`` looks at what has *not* come back: the
age of the oldest unanswered request, and the time since the node last answered
anything. Past the threshold of :class:`HangPolicy` the node gets no new request while
any of its requests waits (``selection.Selector``), and the calls stuck on it are cut
so that they retry elsewhere.

Checks run at every pick and, while requests are in flight, on a small watcher thread
(:func:`start_watcher`), so that a lone caller stuck on a hung node is rescued too.
"""

from __future__ import annotations

import _thread
import logging
import math
import threading
import weakref
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["HangPolicy", "DEFAULT_HANG_POLICY", "start_watcher", "WATCHER_IDLE_ROUNDS"]

log = logging.getLogger(__name__)

# watcher rounds without a request in flight before the watcher thread ends
WATCHER_IDLE_ROUNDS = 50


class HangPolicy:
    """When a node counts as hung: its oldest unanswered request (and its last answer)
    older than ``factor`` × its usual latency, and than ``floor_s``.

    "Usual latency" is the larger of its latency EWMA and half its p99 (refreshed every
    ``refresh_every`` successes), so a node whose answers vary widely (LLM calls of 0.1
    to 60 s) needs a long silence; before ``min_samples`` successes it is the node's cold
    guess (1 s by default). Requiring silence as well means one long call on a node that
    keeps answering others never marks it hung.

    ``rescue``: when a node is found hung, the connections of the calls waiting on it
    are cut, so each fails at once (a timeout) and its attempt loop retries it on
    another node, within the retry budget, instead of sitting out the read timeout.
    Each cut request may still have been billed: it is counted as unconfirmed spend,
    like any timeout after sending.

    Hangs are checked at every pick, and by a watcher thread every ``watch_interval_s``
    while requests are in flight (so a lone caller stuck on a hung node is rescued too);
    it ends after a few idle seconds and starts again with the next pick. None: picks only.
    """

    __slots__ = ("factor", "floor_s", "min_samples", "refresh_every", "rescue", "watch_interval_s")

    def __init__(self, factor: float = 4.0, floor_s: float = 0.25, min_samples: int = 20,
                 refresh_every: int = 64, rescue: bool = True, watch_interval_s: Optional[float] = 0.1) -> None:
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
            raise ConfigError("hang_factor", factor, "must be a finite number >= 1")
        if not (isinstance(floor_s, (int, float)) and math.isfinite(floor_s) and floor_s > 0):
            raise ConfigError("hang_floor_s", floor_s, "must be a finite number of seconds > 0")
        self.factor = float(factor)
        self.floor_s = float(floor_s)
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self.rescue = rescue
        self.watch_interval_s = watch_interval_s


DEFAULT_HANG_POLICY: HangPolicy = HangPolicy()


def start_watcher(selector: Any, stop: threading.Event, interval_s: float) -> bool:
    """Start the watcher thread of ``selector`` (``_watch_once()`` each round); False if
    no thread can be started now. The thread holds the selector weakly: a dropped
    client's watcher ends."""
    try:
        # _thread, as the hedger does: Thread.start() waits on an Event an interrupt could leave locked
        _thread.start_new_thread(_watch, (weakref.ref(selector), stop, interval_s))
    except RuntimeError:
        return False
    return True


def _watch(selector_ref: Any, stop: threading.Event, interval_s: float) -> None:
    try:
        while not stop.wait(interval_s):
            selector = selector_ref()
            if selector is None or not selector._watch_once():
                return
            del selector
    except Exception:  # noqa: BLE001 - logged: a thread has no caller to raise to
        log.warning("hang watcher stopped by an error; picks still check for hangs", exc_info=True)
        selector = selector_ref()
        if selector is not None:
            selector._watcher_failed()
