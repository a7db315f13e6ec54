"""Per-node provider quotas read from ``x-ratelimit-*`` response headers (OpenAI's form).

A node that sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` says how
much of its quota is left and how long until it is full again. :class:`NodeQuota`
keeps the latest reading per kind and estimates what is left *now*: the reading,
refilled continuously since (OpenAI replenishes continuously; the rate is
``(limit - remaining) / reset``), minus the requests this client sent the node since.

Routing uses it two ways (``selection.py``):

* a node whose estimate falls below a small reserve is treated like a throttled one
  until the estimate climbs back (``blocked_until``): the client stops *before* the
  node answers 429;
* among the others, ``headroom()`` (the fraction left, 0..1) lets ``adaptive`` prefer
  nodes with room.

Resets are durations like ``1s``, ``6m0s``, ``120ms``, ``1m30.5s`` (Go's
``time.Duration``, units ``h m s ms us µs ns``), or a bare number of seconds. A
header that does not parse is ignored and counted (``garbage``), never raised: a
gateway's odd header must not fail a call that succeeded.

Not locked by itself: every call happens under the selector's lock, like the rest of
``NodeState``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional

__all__ = ["parse_duration_s", "parse_count", "NodeQuota", "QUOTA_KINDS", "QUOTA_HEADER_PREFIX"]

QUOTA_KINDS = ("requests", "tokens")
QUOTA_HEADER_PREFIX = "x-ratelimit-"

_MAX_HEADER_CHARS = 64
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|μs|ns|h|m|s))+")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_MAX_RESET_S = 7 * 24 * 3600.0  # a reset further than a week away is not a per-minute quota: garbage

# A node is left alone while fewer than this many requests are estimated left: the
# answers we read lag the requests other threads have in flight there.
RESERVE_REQUESTS = 1.0
# ... and while less than this share of its tokens is left (we do not know the next
# call's size before sending it).
RESERVE_TOKENS_FRACTION = 0.02


def parse_duration_s(text: Any) -> Optional[float]:
    """Seconds in a reset header (``1s``, ``6m0s``, ``120ms``, ``1m30.5s``, ``2``); None if garbage."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or len(text) > _MAX_HEADER_CHARS:
        return None
    if _BARE_NUMBER.fullmatch(text):
        seconds = float(text)
    elif _DURATION.fullmatch(text):
        units = [unit for _, unit in _PART.findall(text)]
        if len(set(units)) != len(units):  # "1s2s" is not a duration
            return None
        seconds = sum(float(number) * _UNIT_S[unit] for number, unit in _PART.findall(text))
    else:
        return None
    if not math.isfinite(seconds) or seconds > _MAX_RESET_S:
        return None
    return seconds


def parse_count(text: Any) -> Optional[int]:
    """A non-negative integer header (limit, remaining); None if garbage."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or len(text) > 19 or not text.isdigit() or not text.isascii():
        return None
    return int(text)


class _Reading:
    """One kind's latest reading and the requests sent since it."""

    __slots__ = ("limit", "remaining", "rate_per_s", "at", "sent_since")

    def __init__(self, limit: int, remaining: int, reset_s: float, at: float) -> None:
        self.limit = limit
        self.remaining = min(remaining, limit)
        missing = limit - self.remaining
        # "reset" is the time until full: the refill rate follows. A node that says
        # nothing is missing, or resets at once, refills at least a limit per minute.
        if missing > 0 and reset_s > 0:
            self.rate_per_s = max(missing / reset_s, limit / 3600.0)
        else:
            self.rate_per_s = max(limit / 60.0, 1e-9)
        self.at = at
        self.sent_since = 0

    def left(self, now: float) -> float:
        refilled = self.remaining + self.rate_per_s * max(0.0, now - self.at)
        return min(float(self.limit), refilled)


class NodeQuota:
    """What one node's quota headers said, and what is estimated left now."""

    __slots__ = ("_readings", "garbage", "readings")

    def __init__(self) -> None:
        self._readings: Dict[str, _Reading] = {}
        self.garbage = 0   # headers present but unreadable (ignored)
        self.readings = 0  # answers that carried a usable reading

    def observe(self, headers: Optional[Mapping[str, str]], now: float, *, pending: int = 0) -> None:
        """Read ``x-ratelimit-*`` from an answer's headers (case-insensitive mapping or
        lower-case keys); unreadable values are counted and ignored.

        ``pending``: other requests still unanswered on the node; they may have been
        admitted after this answer's reading, so they are counted as already spent.
        """
        if not headers:
            return
        seen = False
        for kind in QUOTA_KINDS:
            raw = [headers.get(f"{QUOTA_HEADER_PREFIX}{field}-{kind}") for field in ("limit", "remaining", "reset")]
            if all(value is None for value in raw):
                continue
            limit, remaining = parse_count(raw[0]), parse_count(raw[1])
            reset_s = parse_duration_s(raw[2]) if raw[2] is not None else 0.0
            if limit is None or remaining is None or reset_s is None or limit == 0:
                self.garbage += 1
                continue
            reading = _Reading(limit, remaining, reset_s, now)
            reading.sent_since = max(0, pending)
            self._readings[kind] = reading
            seen = True
        if seen:
            self.readings += 1

    def on_send(self) -> None:
        """One request was sent: it spends from what the last readings said."""
        for reading in self._readings.values():
            reading.sent_since += 1

    def _left_requests(self, now: float) -> Optional[float]:
        reading = self._readings.get("requests")
        if reading is None:
            return None
        return reading.left(now) - reading.sent_since

    def headroom(self, now: float) -> float:
        """The smallest fraction left of any known quota (1.0 when none is known)."""
        fraction = 1.0
        for kind, reading in self._readings.items():
            left = reading.left(now) - (reading.sent_since if kind == "requests" else 0)
            fraction = min(fraction, max(0.0, left) / reading.limit)
        return fraction

    def blocked_until(self, now: float) -> float:
        """When the node has room again (``now`` or earlier: it has room now)."""
        until = now - 1.0
        requests = self._readings.get("requests")
        if requests is not None:
            short = RESERVE_REQUESTS + 1.0 - (requests.left(now) - requests.sent_since)
            if short > 0:
                until = max(until, now + short / requests.rate_per_s)
        tokens = self._readings.get("tokens")
        if tokens is not None:
            short = RESERVE_TOKENS_FRACTION * tokens.limit - tokens.left(now)
            if short > 0:
                until = max(until, now + short / tokens.rate_per_s)
        return until

    def snapshot(self, now: float) -> Dict[str, Any]:
        """Per kind: limit, estimated remaining now, seconds until full; plus counters."""
        out: Dict[str, Any] = {"garbage_headers": self.garbage, "readings": self.readings}
        for kind in QUOTA_KINDS:
            reading = self._readings.get(kind)
            if reading is None:
                out[kind] = None
                continue
            left = reading.left(now) - (reading.sent_since if kind == "requests" else 0)
            out[kind] = {
                "limit": reading.limit,
                "remaining": max(0, int(left)),
                "reset_s": round(max(0.0, reading.limit - left) / reading.rate_per_s, 3),
            }
        return out
