"""Retry policy: which outcomes are retried, backoff with full jitter, Retry-After.

The policy is an immutable value shared by every thread; each call walks it with
:meth:`RetryPolicy.backoff_s` and its own attempt number, so no state is shared.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

__all__ = ["RetryPolicy", "parse_retry_after", "parse_should_retry"]


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries a call may make and how long to wait between them.

    Backoff is "full jitter" (``uniform(0, min(cap, base * 2**n))``): it halves the
    work of contending clients compared with plain exponential backoff. The defaults
    are smaller than openai-python's 0.5 s/8 s because each retry goes to a *different*
    node: the first failover should be almost immediate, while a cluster that keeps
    failing still sees the wait double.
    """

    max_retries: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    retry_after_cap_s: float = 60.0

    def backoff_s(self, retry_number: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2 ** max(0, retry_number - 1)))
        return ceiling * rand()


def parse_retry_after(
    headers: Mapping[str, str], now: Optional[Callable[[], float]] = None
) -> Optional[float]:
    """Seconds the server asked us to wait, or None when it did not say (or said garbage).

    Reads ``retry-after-ms`` first, then ``retry-after`` as seconds or an HTTP date.
    Negative, non-finite and unparseable values are ignored rather than trusted.
    ``headers`` must be case-insensitive (requests' headers are).
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        value = _parse_float(raw_ms)
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    value = _parse_float(raw)
    if value is not None:
        return value
    if len(raw) > 64:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    try:
        target = parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    delta = target - (now or time.time)()
    return max(0.0, delta) if math.isfinite(delta) else None


def _parse_float(raw: str) -> Optional[float]:
    text = raw.strip()
    if not text or len(text) > 32:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def parse_should_retry(headers: Mapping[str, str]) -> Optional[bool]:
    """The server's ``x-should-retry`` hint: True, False or None when absent or garbage."""
    raw = headers.get("x-should-retry")
    if raw is None:
        return None
    raw = raw.strip().lower()
    if raw == "true":
        return True
    if raw == "false":
        return False
    return None
